"""One trained model of an RLHF step, on the training mesh with ZeRO / tensor parallelism.

Each step of DeepSpeed-Chat trains one or two models (SFT: the actor;
reward: the reward model; PPO: the actor and the critic). A ``Learner`` is
the jaxspeed train step of one of them with the step's own objective: the
same ``make_train_step`` as pre-training, so ZeRO stages, tensor parallelism,
gradient accumulation, clipping, the LR schedule and the non-finite guard
all apply unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, use_abstract_mesh

from jaxspeed.parallel.rules import compute_rules, named
from jaxspeed.training.optim import make_optimizer, make_schedule
from jaxspeed.training.state import StateSpecs, TrainState, abstract_state, state_specs
from jaxspeed.training.step import (
  CustomObjective,
  LanguageModeling,
  StepOptions,
  TrainStep,
  batch_sharding,
  make_train_step,
)


def mesh_jit(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
  """``jax.jit(fn)`` traced under the logical rules of ``mesh``, as the train step is."""
  def traced(*args):
    with nn.logical_axis_rules(compute_rules()), use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return jax.jit(traced, **jit_kwargs)


def like_batch(arrays, mesh: Mesh):
  """Constrains per-row arrays to the train step's batch sharding (rows over the data axes).

  Inside a jitted function whose outputs feed a train step: jit refuses
  inputs committed to any other sharding.
  """
  return jax.lax.with_sharding_constraint(arrays, batch_sharding(mesh))


def step_optim(optim: ml_collections.ConfigDict, learning_rate: float,
               warmup: int) -> ml_collections.ConfigDict:
  """``config.optim`` with one RLHF step's learning rate and warmup."""
  optim = ml_collections.ConfigDict(optim.to_dict())
  optim.learning_rate, optim.warmup = learning_rate, warmup
  return optim


@dataclasses.dataclass
class Learner:
  """A model, its optimizer, its state shardings and its jitted train step."""

  model: nn.Module
  optimizer: optax.GradientTransformation
  mesh: Mesh
  specs: StateSpecs
  train_step: TrainStep
  sample_input: jax.ShapeDtypeStruct

  @property
  def param_shardings(self):
    """The training placement of each parameter (ZeRO-3 splits them over the data axes)."""
    return named(self.mesh, self.specs.state.params)

  def abstract_state(self) -> TrainState:
    return abstract_state(self.model, self.optimizer, self.sample_input, self.mesh, self.specs)

  def init_params(self, seed: int):
    """Fresh parameters, initialized directly in their shardings."""
    init = lambda: nn.meta.unbox(self.model.init(
        jax.random.PRNGKey(seed), jnp.zeros(self.sample_input.shape, jnp.int32))["params"])
    return mesh_jit(init, self.mesh, out_shardings=self.param_shardings)()

  def start(self, params, seed: int = 0) -> TrainState:
    """A step-0 state around ``params`` with a fresh optimizer state, in the shardings."""
    def init(params) -> TrainState:
      zero = jnp.zeros((), jnp.int32)
      return TrainState(step=zero, params=params, opt_state=self.optimizer.init(params),
                        tokens=zero, layer_tokens=zero, skipped=zero,
                        rng=jax.random.PRNGKey(seed))
    params = jax.device_put(params, self.param_shardings)
    return jax.jit(init, out_shardings=named(self.mesh, self.specs.state))(params)

  def to_device(self, batch: dict) -> dict[str, jax.Array]:
    """Host arrays [B, ...] -> global arrays with rows split over the data axes."""
    return jax.device_put({k: jnp.asarray(v) for k, v in batch.items()},
                          batch_sharding(self.mesh))


def make_learner(model: nn.Module, optim: ml_collections.ConfigDict, steps: int, mesh: Mesh,
                 zero_stage: int, seq_len: int, loss_sum: Callable | None = None,
                 microbatches: int = 1) -> Learner:
  """Builds the train step of ``model`` for ``steps`` updates of the objective ``loss_sum``.

  Args:
    optim: ``config.optim`` (see ``step_optim``); an optax optimizer.
    loss_sum: the objective, a ``jaxspeed.training.step.LossSum``; the
      gradient is that of objective / tokens. None for the language-model
      cross-entropy.
  """
  optimizer = make_optimizer(optim)
  sample_input = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  specs = state_specs(model, optimizer, sample_input, mesh, zero_stage)
  objective = LanguageModeling() if loss_sum is None else CustomObjective(loss_sum)
  train_step = make_train_step(
      model, optimizer, make_schedule(optim, steps), specs, mesh,
      StepOptions(objective, microbatches=microbatches, grad_clip=optim.grad_clip))
  return Learner(model, optimizer, mesh, specs, train_step, sample_input)


def fit(learner: Learner, state: TrainState, batch_at: Callable[[int], dict], steps: int,
        log_every: int = 10, name: str = "") -> tuple[TrainState, list[dict[str, float]]]:
  """Runs ``steps`` updates on ``batch_at(step)``; returns the state and logged metrics."""
  records = []
  for step in range(steps):
    state, metrics = learner.train_step(state, learner.to_device(batch_at(step)), step)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      records.append({"step": step + 1, **{k: float(v) for k, v in metrics.items()
                                           if jnp.ndim(v) == 0}})
      if name:
        print(f"{name} step {step + 1}: loss={records[-1]['loss']:.4f}", flush=True)
  return state, records
