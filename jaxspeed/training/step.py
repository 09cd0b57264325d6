"""The jitted train and eval steps: ``step(state, batch) -> (state, metrics)``.

``make_train_step(model, optimizer, schedule, specs, mesh, StepOptions(...))``:
the options hold each technique's part of the step (the objective, layer
dropping, the dense interceptor of compression, microbatches, clipping).

A batch is a dict of [B, S] arrays: ``inputs`` and ``targets`` (int32), and
optionally ``loss_mask`` (float32, 1 where the target counts) and model
keyword inputs (``positions``, ``token_types``, ``padding_mask``). B is the
global batch, split over the data axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable
from typing import ClassVar, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental.compute_on import compute_on
from jax.sharding import Mesh, NamedSharding, use_abstract_mesh
from jax.sharding import PartitionSpec as P

from jaxspeed.comm.norm_sketch import mean_norm_estimate
from jaxspeed.models.layer_drop import pld_theta
from jaxspeed.models.layers import DenseInterceptor, fetching_block_params, intercept_dense
from jaxspeed.models.losses import cross_entropy
from jaxspeed.models.pipelined_gpt import PipelinedGPT
from jaxspeed.models.random_ltd import layer_tokens
from jaxspeed.moe import stats as moe_stats
from jaxspeed.moe.balancing import move_biases
from jaxspeed.moe.mos import TEACHER_LOGITS, Distillation, kd_loss_sum
from jaxspeed.optimizers.base import CommunicatingOptimizer
from jaxspeed.optimizers.master import MasterWeightsState, apply_updates
from jaxspeed.parallel.mesh import DATA_AXES, spec_axes
from jaxspeed.parallel.pipeline import is_layer_name, to_microbatches
from jaxspeed.parallel.rules import compute_rules, named
from jaxspeed.parallel.ulysses import SEQUENCE_AXIS
from jaxspeed.parallel.zeropp import Zero3Gather
from jaxspeed.training.adversarial import EmbeddingNoise, perturbed
from jaxspeed.training.optim import Schedule
from jaxspeed.training.state import (
  StateSpecs,
  TrainState,
  in_memory,
  params_in_memory,
  state_shardings,
)

MODEL_KWARGS = ("positions", "token_types", "padding_mask")
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
DenseInterceptorAt = Callable[[jax.Array | None], DenseInterceptor]
# ``(params, batch, rngs, deterministic, step=None, **model_kwargs) -> (objective, sums)``:
# the objective a step differentiates (its gradient is that of objective / sums["tokens"])
# and sums that add up over microbatches and workers, at least ``loss_sum`` and
# ``tokens``. ``step`` is the traced update index (None when evaluating);
# ``model_kwargs`` are the model's layer-dropping arguments.
LossSum = Callable[..., tuple[jax.Array, Metrics]]
LR_UNITS = ("steps", "tokens", "layer_tokens")


def loss_sum_fn(model: nn.Module, *, aux_loss_coef: float = 0.0,
                distillation: Distillation | None = None) -> LossSum:
  """The language-model ``LossSum`` of ``model`` (see ``LossSum`` for the contract).

  ``rngs`` maps flax rng streams (``dropout``, ``random_ltd``, ``layer_drop``,
  ``moe``) to keys, or is None for evaluation. ``sums`` adds up over
  microbatches and workers: ``loss_sum`` (summed token cross-entropy),
  ``tokens`` (counted tokens) and, for MoE models, the ``moe_*`` sums of
  ``jaxspeed.moe.stats.step_sums``. The objective is ``loss_sum`` plus
  ``aux_loss_coef`` · Σ_layers l_aux · tokens, so that divided by the token
  count it is DeepSpeed-MoE's CE + coef · Σ l_aux. A batch with
  ``TEACHER_LOGITS`` [B, S, V] (put there by ``KnowledgeDistillation.prepare``)
  adds MoS's distillation term weighted by ``distillation``
  (``jaxspeed.moe.mos``), summed as ``kd_sum``.
  """
  def loss_sum(params, batch: Batch, rngs, deterministic: bool, step=None, **model_kwargs):
    del step
    kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
    apply = functools.partial(model.apply, {"params": params}, batch["inputs"],
                              deterministic=deterministic, rngs=rngs,
                              mutable=[moe_stats.COLLECTION], **kwargs, **model_kwargs)
    if getattr(model, "computes_loss", False):  # a 1F1B pipeline: the loss is inside it
      (ce, count), collections = apply(targets=batch["targets"],
                                       loss_mask=batch.get("loss_mask"))
    else:
      logits, collections = apply()
      ce, count = cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
    sown = collections.get(moe_stats.COLLECTION, {})
    sums = {"loss_sum": ce, "tokens": count, **moe_stats.step_sums(sown, count)}
    objective = aux_loss_coef * moe_stats.aux_loss(sown) * count
    if TEACHER_LOGITS in batch:
      kd = Distillation() if distillation is None else distillation
      sums["kd_sum"] = kd_loss_sum(logits, batch[TEACHER_LOGITS], kd.temperature,
                                   batch.get("loss_mask"))
      return objective + kd.alpha_ce * ce + kd.beta_ce * sums["kd_sum"], sums
    return objective + ce, sums
  return loss_sum


def intercepted(loss_sum: LossSum, dense_interceptor: DenseInterceptorAt | None) -> LossSum:
  """``loss_sum`` with the weight matmuls of its forward run by ``dense_interceptor(step)``."""
  if dense_interceptor is None:
    return loss_sum

  def run(params, batch: Batch, rngs, deterministic: bool, step=None, **model_kwargs):
    with intercept_dense(dense_interceptor(step)):
      return loss_sum(params, batch, rngs, deterministic, step, **model_kwargs)
  return run


class Objective(Protocol):
  """What a train step minimizes.

  Attributes:
    passes_model_kwargs: whether ``loss_sum`` hands the step's model keyword
      arguments (random-LTD's kept length, PLD's θ) to the model; layer
      dropping needs an objective that does.
  """

  passes_model_kwargs: ClassVar[bool]

  def loss_sum(self, model: nn.Module) -> LossSum:
    """The objective's ``LossSum`` for ``model``."""

  def prepare(self, state: TrainState, batch: Batch, step: int) -> Batch:
    """The batch the jitted step receives for update ``step`` (host side, before the call)."""


@dataclasses.dataclass(frozen=True)
class LanguageModeling:
  """Token cross-entropy plus ``aux_loss_coef`` times DeepSpeed-MoE's load-balancing loss."""

  aux_loss_coef: float = 0.0
  passes_model_kwargs: ClassVar[bool] = True

  def loss_sum(self, model: nn.Module) -> LossSum:
    return loss_sum_fn(model, aux_loss_coef=self.aux_loss_coef)

  def prepare(self, state: TrainState, batch: Batch, step: int) -> Batch:
    del state, step
    return batch


@dataclasses.dataclass(frozen=True)
class KnowledgeDistillation:
  """MoS (DeepSpeed-MoE §5): ``LanguageModeling`` plus the KD term toward a teacher's logits.

  Attributes:
    teacher: ``inputs [B, S] -> logits [B, S, V]``, the teacher's forward with
      its parameters (``jaxspeed.training.trainer.TeacherLogits``).
    distillation: the KD weights α, β and temperature T.
    aux_loss_coef: as for ``LanguageModeling``.
    stop_step: staged KD distills updates ``step < stop_step`` only; 0 for all.

  The teacher runs as its own program before each distilled update
  (``prepare``); its logits reach ``loss_sum`` in the batch under
  ``TEACHER_LOGITS``, so microbatches and workers split them with the batch.
  """

  teacher: Callable[[jax.Array], jax.Array]
  distillation: Distillation = dataclasses.field(default_factory=Distillation)
  aux_loss_coef: float = 0.0
  stop_step: int = 0
  passes_model_kwargs: ClassVar[bool] = True

  def loss_sum(self, model: nn.Module) -> LossSum:
    return loss_sum_fn(model, aux_loss_coef=self.aux_loss_coef, distillation=self.distillation)

  def distills(self, step: int) -> bool:
    return not self.stop_step or step < self.stop_step

  def prepare(self, state: TrainState, batch: Batch, step: int) -> Batch:
    if not self.distills(step):
      return batch
    # The previous step must finish first: with two programs' collectives in
    # flight, XLA:CPU's in-process rendezvous can starve on a loaded host
    # (seen as an all-reduce termination timeout).
    jax.block_until_ready(state)
    return {**batch, TEACHER_LOGITS: self.teacher(batch["inputs"])}


@dataclasses.dataclass(frozen=True)
class CustomObjective:
  """Any ``LossSum`` (e.g. the RLHF losses of ``jaxspeed.rlhf``), already bound to its model.

  It receives no layer-dropping arguments it would pass on, so ``StepOptions``
  rejects layer dropping with it.
  """

  fn: LossSum
  passes_model_kwargs: ClassVar[bool] = False

  def loss_sum(self, model: nn.Module) -> LossSum:
    del model
    return self.fn

  def prepare(self, state: TrainState, batch: Batch, step: int) -> Batch:
    del state, step
    return batch


def step_rngs(state_rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
  """The rng streams of one step: dropout, random-LTD and MoE-gate keys, and the PLD key.

  The ``layer_drop`` key is shared by every worker and microbatch (one
  layer-drop draw per step); the others are folded with the worker and
  microbatch index where those exist (``fold_rngs``).
  """
  key = jax.random.fold_in(state_rng, step)
  return {"dropout": key, "random_ltd": jax.random.fold_in(key, 1),
          "layer_drop": jax.random.fold_in(key, 2), "moe": jax.random.fold_in(key, 3)}


def fold_rngs(rngs: dict[str, jax.Array], index) -> dict[str, jax.Array]:
  """Per-worker or per-microbatch keys; ``layer_drop`` stays shared."""
  return {k: v if k == "layer_drop" else jax.random.fold_in(v, index) for k, v in rngs.items()}


def split_microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B/num, ...] leaves, strided as a pipeline's microbatches
  (``jaxspeed.parallel.pipeline.to_microbatches``): no data moves between devices."""
  return jax.tree.map(lambda x: to_microbatches(x, num), batch)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over ``data`` x ``fsdp``, sequence over ``sequence`` (Ulysses)."""
  return NamedSharding(mesh, P(DATA_AXES, SEQUENCE_AXIS))


ALLREDUCE = "allreduce"  # the one communication kind of an optax optimizer


@dataclasses.dataclass(frozen=True)
class LayerDropping:
  """What random-LTD and progressive layer dropping do at each step.

  Attributes:
    random_ltd: step -> tokens each middle layer keeps (random-LTD), or None
      for no random-LTD; a host-side schedule, so each value compiles once.
    pld: (theta_bar, gamma) of progressive layer dropping, or None.
    num_layers: L, for the layer-token count.
  """

  random_ltd: Callable[[int], int] | None = None
  pld: tuple[float, float] | None = None
  num_layers: int = 1

  @property
  def enabled(self) -> bool:
    return self.random_ltd is not None or self.pld is not None

  def kept_length_at(self, step: int) -> int | None:
    """Random-LTD's kept length at ``step``; None to keep all tokens."""
    return None if self.random_ltd is None else self.random_ltd(step)

  def model_kwargs(self, kept: int | None, step: jax.Array) -> dict:
    kwargs = {}
    if kept is not None:
      kwargs["random_ltd_kept"] = kept
    if self.pld is not None:
      kwargs["layer_keep_theta"] = pld_theta(step, *self.pld)
    return kwargs

  def layer_tokens(self, kept: int | None, rows: int, seq_len: int) -> int:
    """Tokens summed over layers for one batch of ``rows`` x ``seq_len``."""
    if kept is None or kept >= seq_len:
      return rows * seq_len * self.num_layers
    return rows * layer_tokens(kept, seq_len, self.num_layers)


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Everything a train step does besides the model, optimizer, schedule and placement.

  Each part comes from one technique; every one is applied, and a
  combination one part would ignore is rejected here.

  Attributes:
    objective: what to minimize (``LanguageModeling``, ``KnowledgeDistillation``,
      ``CustomObjective``).
    microbatches: sequential gradient accumulation over this many slices of the batch.
    grad_clip: global-norm gradient clipping; 0 for none.
    lr_unit: what ``schedule`` counts, one of ``LR_UNITS``.
    deterministic: False to train with dropout.
    layer_dropping: random-LTD and progressive layer dropping.
    dense_interceptor: ``step -> interceptor`` running the weight matmuls of
      the objective's forward compressed (``jaxspeed.compression``).
    quantized_weights: ZeRO++'s qwZ: ZeRO-3 parameters all-gathered in int8
      (``jaxspeed.parallel.zeropp``).
    hierarchical_partition: ZeRO++'s hpZ: ZeRO-3 parameters gathered across nodes into a
      secondary copy split inside the node, then inside the node (``jaxspeed.parallel.zeropp``).
    quantized_gradients: ZeRO++'s qgZ: the ZeRO-3 gradient reduce-scatter that crosses
      nodes exchanges int4 codes.
    speculate: SuperOffload's speculation-then-validation (Lian et al. 2025) for
      an update on the host: it starts from the unclipped gradient, before the
      global norm is known, and is redone from the clipped one in the steps
      where clipping applies; a non-finite result is rolled back by the guard.
    reduce_scatter: reduce the gradients onto ZeRO-2/3's slices with an explicit
      reduce-scatter over the data axes (``_per_device_value_and_grad``; qwZ and hpZ
      imply it).
    expert_bias_rate: auxiliary-loss-free balancing's u: after each update every MoE
      layer's routing bias moves by u · sign(mean load − load) (``jaxspeed.moe.balancing``);
      0 for none.
    adversarial: ScaLA's adversarial embedding noise: the objective is taken at the
      token embeddings plus the worst δ of an ε-ball (``jaxspeed.training.adversarial``);
      None for none.
  """

  objective: Objective = LanguageModeling()
  microbatches: int = 1
  grad_clip: float = 0.0
  lr_unit: str = "steps"
  deterministic: bool = True
  layer_dropping: LayerDropping = LayerDropping()
  dense_interceptor: DenseInterceptorAt | None = None
  quantized_weights: bool = False
  hierarchical_partition: bool = False
  quantized_gradients: bool = False
  speculate: bool = False
  reduce_scatter: bool = False
  expert_bias_rate: float = 0.0
  adversarial: EmbeddingNoise | None = None

  def __post_init__(self):
    if self.microbatches < 1:
      raise ValueError(f"microbatches={self.microbatches}; must be >= 1")
    if self.lr_unit not in LR_UNITS:
      raise ValueError(f"lr_unit={self.lr_unit!r}; allowed: {', '.join(LR_UNITS)}")
    if self.layer_dropping.enabled and not self.objective.passes_model_kwargs:
      raise ValueError(f"layer_dropping (random-LTD / PLD) needs an objective that passes its "
                       f"arguments to the model; {type(self.objective).__name__} does not")

  @property
  def per_device(self) -> StepOptions | None:
    """These options, if the gradient is computed per data-parallel device (an explicit
    reduce-scatter, or ZeRO++'s gathers), else None."""
    explicit = (self.reduce_scatter or self.quantized_weights or self.hierarchical_partition
                or self.quantized_gradients)
    return self if explicit else None

  def loss_sum(self, model: nn.Module) -> LossSum:
    """The objective's ``LossSum`` of ``model``, under the dense interceptor, at the
    adversarial embeddings if any."""
    return perturbed(intercepted(self.objective.loss_sum(model), self.dense_interceptor),
                     self.adversarial)


class TrainStep:
  """``train_step(state, batch, step=None) -> (state, metrics)``.

  One jitted program per kind of step, compiled on first use: a kind is the
  optimizer's communication (``optimizer.kind_at(step)``; one for optax
  optimizers) and random-LTD's kept length. ``step`` is the 0-based index of
  the update; if omitted it is read from ``state.step`` (a device-to-host
  sync, so the trainer passes it). Before the call the objective prepares
  the batch (``Objective.prepare``; a distillation teacher adds its logits).
  Each program also recompiles per batch shape and structure (sequence-length
  curricula, staged distillation): ``compilations`` counts both.
  """

  def __init__(self, build: Callable[[Hashable], Callable], kind_at: Callable[[int], Hashable],
               prepare: Callable[[TrainState, Batch, int], Batch] = lambda state, batch, step:
               batch):
    self._build = build
    self.kind_at = kind_at
    self.prepare = prepare
    self._jitted: dict[Hashable, Callable] = {}

  def for_kind(self, kind: Hashable):
    if kind not in self._jitted:
      self._jitted[kind] = self._build(kind)
    return self._jitted[kind]

  @property
  def kinds_built(self) -> tuple[Hashable, ...]:
    return tuple(self._jitted)

  @property
  def compilations(self) -> int:
    """Programs compiled so far (kinds x batch shapes)."""
    return sum(f._cache_size() for f in self._jitted.values())

  def __call__(self, state: TrainState, batch: Batch, step: int | None = None):
    step = int(state.step) if step is None else step
    batch = self.prepare(state, batch, step)
    return self.for_kind(self.kind_at(step))(state, batch)

  def lower(self, state: TrainState, batch: Batch, step: int = 0):
    """Lowers the program of ``step``'s kind for ``batch`` as given (not prepared);
    ``state`` may be abstract."""
    return self.for_kind(self.kind_at(step)).lower(state, batch)


def _accumulate(grad_fn, params, batch: Batch, rngs, microbatches: int, deterministic: bool,
                grad_shardings, model_kwargs, on_host: bool = False):
  """(objective, sums, summed gradients) over ``microbatches`` slices of ``batch``.

  With ``on_host``, ``grad_fn``'s gradients come out in host memory (``grad_shardings``
  say where) and are summed there, as ZeRO-Offload accumulates on the CPU.
  """
  if microbatches == 1:
    (objective, sums), grads = grad_fn(params, batch, rngs, deterministic, **model_kwargs)
    return objective, sums, jax.lax.with_sharding_constraint(grads, grad_shardings)

  def add(acc, g):
    return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, g)

  def zeros():  # summed in float32 whatever the parameters' dtype
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                        params)

  if on_host:
    add, zeros = (_on_host(f, grad_shardings) for f in (add, zeros))
  else:
    constrained = lambda f: lambda *args: jax.lax.with_sharding_constraint(f(*args),
                                                                          grad_shardings)
    add, zeros = constrained(add), constrained(zeros)

  def accumulate(carry, xs):
    index, micro = xs
    acc, objective_acc, sums_acc = carry
    (objective, sums), g = grad_fn(params, micro, fold_rngs(rngs, index), deterministic,
                                   **model_kwargs)
    return (add(acc, g), objective_acc + objective, jax.tree.map(jnp.add, sums_acc, sums)), None

  micro_batches = split_microbatches(batch, microbatches)
  first = jax.tree.map(lambda x: x[0], micro_batches)
  _, sums_shape = jax.eval_shape(lambda: grad_fn(params, first, rngs, deterministic,
                                                 **model_kwargs)[0])
  zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
  (grads, objective, sums), _ = jax.lax.scan(
      accumulate, (zeros(), jnp.float32(0), zero_sums), (jnp.arange(microbatches), micro_batches))
  return objective, sums, grads


def _on_host(fn: Callable, out_shardings) -> Callable:
  """``fn`` computed on the host (``compute_on``), its results in ``out_shardings``: out of
  a host computation every result is in host memory until said otherwise."""
  def run(*args):
    with compute_on("device_host"):
      result = jax.jit(fn)(*args)
    return jax.device_put(result, out_shardings)  # say where the results live
  return run


def _all_finite_leaves(tree) -> jax.Array:
  """True if every floating-point leaf of ``tree`` is finite (integer leaves are)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


# One compiled program for the whole tree: checked leaf by leaf outside jit, each leaf's
# reduction would be its own program with its own collectives, and many such programs in
# flight at once can meet in different orders on different devices or processes and wait
# forever (XLA:CPU's collectives).
all_finite = jax.jit(_all_finite_leaves)


def _balance_experts(state: TrainState, params, opt_state, loads, rate: float):
  """(params, opt_state) with the MoE routing biases moved from their values in ``state``
  by the step's ``loads`` (``jaxspeed.moe.balancing.move_biases``): in the float32 master
  weights too, if the optimizer keeps them, whatever the optimizer made of the biases."""
  if not isinstance(state.opt_state, MasterWeightsState):
    return move_biases(state.params, params, loads, rate), opt_state
  master = move_biases(state.opt_state.master, opt_state.master, loads, rate)
  return (move_biases(state.opt_state.master, params, loads, rate),
          opt_state.replace(master=master))


def _finish(state: TrainState, params, opt_state, objective, grad_norm, lr, sums,
            batch: Batch, layer_tokens: int, opt_finite: jax.Array | None = None,
            expert_bias_rate: float = 0.0) -> tuple[TrainState, Metrics]:
  """The non-finite guard, counters and metrics shared by both step builders.

  ``opt_finite`` says whether ``opt_state`` is finite when it was checked where it
  lives (in host memory, ``_host_update``); None to check it here. A non-zero
  ``expert_bias_rate`` moves the MoE routing biases (``_balance_experts``).
  """
  if expert_bias_rate:
    params, opt_state = _balance_experts(state, params, opt_state, sums["moe_loads"],
                                         expert_bias_rate)
  # A finite loss and gradient can still give a non-finite update (overflow at a huge
  # learning rate, 0/0 in an optimizer): the new parameters and optimizer state must be
  # finite too, or the step is skipped. Checking the new parameters covers the update.
  if opt_finite is None:
    opt_finite = _all_finite_leaves(opt_state)
  finite = (jnp.isfinite(objective) & jnp.isfinite(grad_norm)
            & _all_finite_leaves(params) & opt_finite)
  # One branch on the flag, not a select per leaf: XLA copies the cheap chain of per-leaf
  # checks into every select's fusion, and with many small leaves (1-bit LAMB's per-tensor
  # scalars) the program grows with the square of the leaf count (compiling took 15x longer).
  params, opt_state = jax.lax.cond(finite, lambda: (params, opt_state),
                                   lambda: (state.params, state.opt_state))
  new_state = TrainState(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      tokens=state.tokens + batch["inputs"].size,
      layer_tokens=state.layer_tokens + layer_tokens,
      skipped=state.skipped + (~finite).astype(jnp.int32),
      rng=state.rng,
  )
  count = sums["tokens"]
  metrics = {"loss": sums["loss_sum"] / count, "grad_norm": grad_norm, "learning_rate": lr,
             "skipped_steps": new_state.skipped, "tokens": count,
             "seq_len": jnp.int32(batch["inputs"].shape[1]),
             **moe_stats.step_metrics(sums, count)}
  if "kd_sum" in sums:
    metrics["kd_loss"] = sums["kd_sum"] / count
  return new_state, metrics


_CLIP_EPS = 1e-6


def _clip_factor(grad_norm: jax.Array, grad_clip: float) -> jax.Array:
  """The factor global-norm clipping multiplies the gradients by: 1 when it does not apply."""
  if grad_clip <= 0:
    return jnp.float32(1.0)
  return jnp.minimum(1.0, grad_clip / (grad_norm + _CLIP_EPS))


def _clip(grads, grad_norm, grad_clip: float):
  if grad_clip <= 0:
    return grads
  factor = _clip_factor(grad_norm, grad_clip)
  return jax.tree.map(lambda g: g * factor, grads)


def make_train_step(model: nn.Module, optimizer, schedule: Schedule, specs: StateSpecs,
                    mesh: Mesh, options: StepOptions = StepOptions()) -> TrainStep:
  """Builds the train step, jitted with shardings, for an optax or communicating optimizer.

  One optimizer step per call: gradients of ``options.objective`` per token
  over the whole global batch (accumulated over ``options.microbatches``),
  clipped by global norm, optimizer update scaled by ``schedule`` of the
  step, tokens or layer-tokens seen (``options.lr_unit``). A step with a
  non-finite loss, gradient or update leaves parameters and optimizer state
  untouched and counts itself in ``state.skipped``. With the optimizer state
  offloaded (``specs.offloaded``, ZeRO-Offload), the step reads and writes it in
  host memory and runs the update there (``specs.host_update``) or on device.

  Raises:
    ValueError: for options ``model`` cannot apply (a ``PipelinedGPT`` has its
      own microbatches and runs no layer dropping).
  """
  if isinstance(model, PipelinedGPT):
    if options.microbatches > 1:
      raise ValueError("a PipelinedGPT splits the batch into its own microbatches; pass "
                       "microbatches=1 (the trainer does) instead of accumulating sequentially")
    if options.layer_dropping.enabled:
      raise ValueError("a PipelinedGPT runs no random-LTD or progressive layer dropping")
    if options.adversarial is not None:
      raise ValueError("a PipelinedGPT computes its loss inside the pipeline; adversarial "
                       "embedding noise needs the whole forward in one objective")
  if options.speculate and not specs.host_update:
    raise ValueError("speculate needs the optimizer update on the host (StateSpecs.host_update)")
  if options.per_device is not None and isinstance(optimizer, CommunicatingOptimizer):
    raise ValueError("reduce_scatter and ZeRO++ reduce ZeRO-2/3 gradients, which the 1-bit "
                     "optimizers do not shard")
  dropping = options.layer_dropping
  run = dict(microbatches=options.microbatches, lr_unit=options.lr_unit,
             grad_clip=options.grad_clip, deterministic=options.deterministic,
             dropping=dropping, loss_sum=options.loss_sum(model),
             expert_bias_rate=options.expert_bias_rate)
  prepare = options.objective.prepare
  if isinstance(optimizer, CommunicatingOptimizer):
    build = lambda kind: _communicating_step(optimizer, schedule, specs, mesh, *kind, **run)
    return TrainStep(build, lambda step: (optimizer.kind_at(step),
                                          dropping.kept_length_at(step)), prepare)
  build = lambda kind: _optax_step(optimizer, schedule, specs, mesh, kind[1],
                                   speculate=options.speculate,
                                   stream_gradients=specs.stream_gradients,
                                   per_device=options.per_device, **run)
  return TrainStep(build, lambda step: (ALLREDUCE, dropping.kept_length_at(step)), prepare)


def _schedule_time(state: TrainState, lr_unit: str) -> jax.Array:
  return {"steps": state.step, "tokens": state.tokens,
          "layer_tokens": state.layer_tokens}[lr_unit]


def _optax_step(optimizer: optax.GradientTransformation, schedule: Schedule,
                specs: StateSpecs, mesh: Mesh, kept: int | None, *, microbatches: int,
                lr_unit: str, grad_clip: float, deterministic: bool, dropping: LayerDropping,
                loss_sum: Callable, speculate: bool, stream_gradients: bool,
                per_device: StepOptions | None, expert_bias_rate: float):
  """The step of an optax optimizer: XLA inserts the gradient all-reduce.

  With ``stream_gradients`` (an update on the host), each block's gradient goes
  to host memory as the backward pass produces it (``_gradients_streamed_to_host``)
  and the scaling, global norm, clipping and update all run there: device memory
  never holds the whole gradient.
  """
  shardings = state_shardings(mesh, specs)
  grad_shardings = named(mesh, specs.grads)
  update_shardings = named(mesh, specs.update)
  if stream_gradients:
    grad_fn = _gradients_streamed_to_host(loss_sum, shardings.params, specs.opt_memory_kind)
    grad_shardings = in_memory(shardings.params, specs.opt_memory_kind)
  elif per_device is not None:
    grad_fn = _per_device_value_and_grad(loss_sum, mesh, specs, per_device)
  else:
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    if specs.params_offloaded:  # the blocks' gradients come out in host memory
      grad_fn = _gradients_on_device(grad_fn)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rngs = step_rngs(state.rng, state.step)
    model_kwargs = {**dropping.model_kwargs(kept, state.step), "step": state.step}
    with nn.logical_axis_rules(compute_rules()), use_abstract_mesh(mesh.abstract_mesh):
      objective, sums, grads = _accumulate(grad_fn, state.params, batch, rngs, microbatches,
                                             deterministic, grad_shardings, model_kwargs,
                                             on_host=stream_gradients)
    count = sums["tokens"]
    if stream_gradients:
      grads, grad_norm = _scaled_on_host(grads, count, mesh, specs)
    else:
      grads = jax.tree.map(lambda g: g / count, grads)
      grads = jax.lax.with_sharding_constraint(grads, update_shardings)
      grad_norm = optax.tree.norm(grads)
    lr = schedule(_schedule_time(state, lr_unit))
    opt_finite = None
    unclipped = grads
    if stream_gradients:
      grads = _clipped_on_host(grads, grad_norm, grad_clip, mesh, specs)
    else:
      grads = _clip(grads, grad_norm, grad_clip)
    host_update = lambda grads: _host_update(optimizer, grads, state.opt_state, state.params,
                                             lr, mesh, specs)
    if speculate:
      # The update does not wait for the norm; clipping multiplies by exactly 1 when it
      # does not apply, so the speculative result is the validated one in those steps.
      clips = (grad_clip > 0) & (grad_norm + _CLIP_EPS > grad_clip)
      speculative = host_update(unclipped)
      params, opt_state, opt_finite = jax.lax.cond(clips, lambda: host_update(grads),
                                                   lambda: speculative)
    elif specs.host_update:
      params, opt_state, opt_finite = host_update(grads)
    else:
      state = _on_device(state) if specs.offloaded or specs.params_offloaded else state
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      updates = jax.lax.with_sharding_constraint(updates, update_shardings)
      params, opt_state = apply_updates(state.params, updates, opt_state, lr)
    new_state, metrics = _finish(state, params, opt_state, objective / count, grad_norm, lr,
                                 sums, batch, dropping.layer_tokens(kept, *batch["inputs"].shape),
                                 opt_finite, expert_bias_rate)
    if speculate:
      metrics["speculation_redone"] = clips.astype(jnp.int32)
    return new_state, metrics

  return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


def _on_device(state: TrainState) -> TrainState:
  """``state`` with its host-memory leaves brought to device memory, same slices.

  For an offloaded optimizer that updates on device (``StateSpecs.host_update``
  False), or offloaded parameters: they live on the host between steps, and the
  step's output shardings write the new values back there.
  """
  return jax.device_put(state, jax.memory.Space.Device)


def _gradients_on_device(grad_fn: Callable) -> Callable:
  """``grad_fn`` (a ``value_and_grad``) with its gradients moved to device memory."""
  def fn(*args, **kwargs):
    value, grads = grad_fn(*args, **kwargs)
    return value, jax.device_put(grads, jax.memory.Space.Device)
  return fn


def _gradients_streamed_to_host(loss_sum: LossSum, params_shardings, host_kind: str) -> Callable:
  """ZeRO-Offload's gradient streaming (Ren et al. 2021, §4.1): a ``value_and_grad`` of
  ``loss_sum`` whose gradients leave device memory block by block.

  The gradient is taken with respect to a host-memory view of the parameters
  (same slices). The blocks copy their parameters to device memory where they
  read them (a model built with ``params_on_host``), so the transpose of that
  copy puts each block's gradient in host memory as soon as the backward pass
  has it; the other parameters (embeddings, final norm) are copied once, at
  the top. The price is one extra device-to-host copy of the low-precision
  parameters per step; XLA schedules all copies.
  """
  host = in_memory(params_shardings, host_kind)
  fetched = params_in_memory(in_memory(params_shardings, "device"), host_kind)

  def objective(host_params, *args, **kwargs):
    return loss_sum(jax.device_put(host_params, fetched), *args, **kwargs)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def fn(params, *args, **kwargs):
    return grad_fn(jax.device_put(params, host), *args, **kwargs)
  return fn


def _per_device_value_and_grad(loss_sum: LossSum, mesh: Mesh, specs: StateSpecs,
                               options: StepOptions) -> Callable:
  """A ``value_and_grad`` of ``loss_sum`` run on each data-parallel device's rows (a
  ``jax.shard_map`` manual over the data axes; tensor and sequence axes stay with the
  compiler), with the ZeRO collectives written out.

  ZeRO-2 (Rajbhandari et al. 2020, §5.2): each gradient is reduce-scattered onto its
  slice, so a device sends (N−1)/N of a gradient where an all-reduce sends 2(N−1)/N
  (what XLA:CPU compiles a gradient constrained to ZeRO's slices to: an all-reduce and a
  slice). ZeRO-3: the parameters arrive as slices and are all-gathered explicitly, the
  embeddings on entry and each block's where the block runs (``fetching_block_params``;
  ``jaxspeed.parallel.zeropp.Zero3Gather``: with ZeRO++'s qwZ in int8, with hpZ in two
  levels, the cross-node one on entry), and the gathers' transposes reduce-scatter their
  gradients. Reductions run in
  float32; a leaf too small to split is all-reduced. Per-device keys are folded with the
  device's index, as ``fold_rngs`` does for workers.

  Returns:
    ``(params, batch, rngs, deterministic, **model_kwargs) -> ((objective, sums), grads)``,
    the gradients placed by ``specs.grads``.
  """
  axes = tuple(a for a in DATA_AXES if mesh.shape[a] > 1)
  is_spec = lambda x: isinstance(x, P)
  manual = lambda spec: P(*(tuple(a for a in spec_axes(e) if a in axes) or None for e in spec))
  params_in = jax.tree.map(manual, specs.state.params, is_leaf=is_spec)
  grads_out = jax.tree.map(manual, specs.grads, is_leaf=is_spec)

  gather = Zero3Gather(dict(mesh.shape), axes, quantized=options.quantized_weights,
                       hierarchical=options.hierarchical_partition,
                       quantized_grad=options.quantized_gradients)

  def objective(params, *args, **kwargs):
    # The blocks' parameters are gathered where each block runs (ZeRO-3: one block's at a
    # time, again in the backward pass under remat), after hpZ's cross-node level here.
    blocks = [name for name in params if is_layer_name(name)]
    pick = lambda tree, names: {name: tree[name] for name in names}
    split = lambda names: (pick(params, names), pick(specs.state.params, names),
                           pick(specs.tensor_parallel, names))
    secondary = gather.tree(*split(blocks), level="cross_node")
    params = {**gather.tree(*split([n for n in params if n not in blocks])), **secondary}
    # A pipeline's stacked layers are not ``layer_i`` blocks: gathered above, whole.
    fetch = _block_gather(gather, secondary, *split(blocks)[1:]) if blocks else None
    with fetching_block_params(fetch):
      return loss_sum(params, *args, **kwargs)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def reduce(grad: jax.Array, arrived: P, spec: P) -> jax.Array:
    if any(arrived):  # a ZeRO-3 slice: its gather's transpose reduced it
      return grad
    grad = grad.astype(jnp.promote_types(grad.dtype, jnp.float32))
    for dim, entry in enumerate(spec):
      if entry is not None:
        grad = jax.lax.psum_scatter(grad, entry, scatter_dimension=dim, tiled=True)
    rest = tuple(a for a in axes if a not in {a for e in spec for a in spec_axes(e)})
    return jax.lax.psum(grad, rest) if rest else grad

  def fn(params, batch: Batch, rngs, deterministic: bool, **model_kwargs):
    def local(params, batch, rngs):
      rngs = fold_rngs(rngs, jax.lax.axis_index(axes))
      with nn.logical_axis_rules(compute_rules(batch_axes=None)):
        (objective, sums), grads = grad_fn(params, batch, rngs, deterministic, **model_kwargs)
      grads = jax.tree.map(reduce, grads, params_in, grads_out, is_leaf=is_spec)
      return jax.lax.psum((objective, sums), axes), grads

    return jax.shard_map(local, mesh=mesh, in_specs=(params_in, P(axes), P()),
                         out_specs=(P(), grads_out), axis_names=frozenset(axes),
                         check_vma=False)(params, batch, rngs)
  return fn


def _block_gather(gather: Zero3Gather, blocks: dict, specs: dict, gathered_specs: dict
                  ) -> Callable[[dict], dict]:
  """The ``fetching_block_params`` function of ZeRO-3's per-block gather: each leaf of a
  block's parameters gathered at ``level="node"`` with the specs of the same leaf of
  ``blocks`` (``{layer_i: tree}``), found by its path in the block and its local shape."""
  table = {}
  is_spec = lambda x: isinstance(x, P)
  for name, tree in blocks.items():
    for (path, x), spec, gathered in zip(jax.tree_util.tree_leaves_with_path(tree),
                                         jax.tree.leaves(specs[name], is_leaf=is_spec),
                                         jax.tree.leaves(gathered_specs[name], is_leaf=is_spec),
                                         strict=True):
      table[jax.tree_util.keystr(path), x.shape] = (spec, gathered)

  def fetch(params: dict) -> dict:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: gather.leaf(x, *table[jax.tree_util.keystr(path), x.shape], "node"),
        params)
  return fetch


def _scaled_on_host(grads, count: jax.Array, mesh: Mesh, specs: StateSpecs):
  """Host-memory gradient sums divided by the token ``count`` and moved to the update's
  slices (``specs.update``), on the host; returns them and their global norm (a device
  scalar)."""
  host = in_memory(named(mesh, specs.update), specs.opt_memory_kind)
  scalar = NamedSharding(mesh, P())
  grads = jax.device_put(grads, host)
  count = jax.device_put(count, scalar.with_memory_kind(specs.opt_memory_kind))

  def scale(grads, count):
    grads = jax.tree.map(lambda g: g / count, grads)
    return grads, jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))

  return _on_host(scale, (host, scalar.with_memory_kind("device")))(grads, count)


def _clipped_on_host(grads, grad_norm: jax.Array, grad_clip: float, mesh: Mesh,
                     specs: StateSpecs):
  """Host-memory ``grads`` clipped by global norm (``_clip``), on the host."""
  if grad_clip <= 0:
    return grads
  factor = jax.device_put(_clip_factor(grad_norm, grad_clip),
                          NamedSharding(mesh, P(), memory_kind=specs.opt_memory_kind))
  # Where clipping does not apply the gradient passes through untouched, bit for bit
  # (XLA may fold the factor into the host computation that divided by the token count).
  clip = lambda grads, factor: jax.tree.map(lambda g: jnp.where(factor < 1, g * factor, g),
                                            grads)
  return _on_host(clip, in_memory(named(mesh, specs.update), specs.opt_memory_kind))(
      grads, factor)


def _host_update(optimizer: optax.GradientTransformation, grads, opt_state, params,
                 lr: jax.Array, mesh: Mesh, specs: StateSpecs):
  """ZeRO-Offload's optimizer step (Ren et al. 2021, §4.1): the update runs on the host.

  Each device's own ZeRO slice (``specs.update``) of the gradient is in its host
  memory (streamed there, or moved now), where its slice of the optimizer
  state already is; without master weights the parameters go down too (the
  update adds to them, and AdamW's decoupled decay reads them). The new
  parameters, rounded to their dtype on the host (``apply_updates``), come
  back to device memory in the same slices. The new optimizer state stays on
  the host and is checked for non-finite values there, for the step's guard.

  Returns:
    (parameters in device memory, new optimizer state in host memory, whether
    that state is finite: a device scalar).
  """
  update_shardings = named(mesh, specs.update)
  host = in_memory(update_shardings, specs.opt_memory_kind)
  grads = jax.device_put(grads, host)
  scalar = NamedSharding(mesh, P())
  lr = jax.device_put(lr, scalar.with_memory_kind(specs.opt_memory_kind))
  # With a float32 master on the host, the low-precision parameters are not read.
  params = None if isinstance(opt_state, MasterWeightsState) else jax.device_put(params, host)

  def update(grads, opt_state, params, lr):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params, opt_state = apply_updates(params, updates, opt_state, lr)
    return params, opt_state, _all_finite_leaves(opt_state)

  params_shardings = in_memory(update_shardings, "device")
  if specs.params_offloaded:  # ZeRO-3: the update's slices are the parameters' slices
    params_shardings = params_in_memory(params_shardings, specs.block_params_memory_kind)
  placed = (params_shardings, state_shardings(mesh, specs).opt_state,
            scalar.with_memory_kind("device"))
  return _on_host(update, placed)(grads, opt_state, params, lr)


def _communicating_step(optimizer: CommunicatingOptimizer, schedule: Schedule,
                        specs: StateSpecs, mesh: Mesh, kind: str, kept: int | None, *,
                        microbatches: int, lr_unit: str, grad_clip: float, deterministic: bool,
                        dropping: LayerDropping, loss_sum: Callable, expert_bias_rate: float):
  """The step of a communicating optimizer for one communication ``kind``.

  Each worker's gradient is computed without any reduction (``vmap`` over a
  worker axis mapped onto the data axes), scaled so that the worker mean is
  the gradient of the global token-mean loss, and handed to the optimizer.

  Gradient norm for clipping and the non-finite guard: on exact kinds, the
  norm of the averaged gradient (as for optax optimizers); on compressed
  kinds, the same norm estimated from a CountSketch of the workers' gradients
  (``jaxspeed.comm.norm_sketch``: one all-reduce of at most 4096 floats, a few
  percent error), so every worker clips by the same factor and the norm is the
  averaged gradient's, not the larger norms of the noisy local ones; on local
  kinds (no communication), the root-mean-square of the workers' local norms,
  one scalar all-reduce.
  """
  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
  world = math.prod(mesh.shape[a] for a in DATA_AXES)
  shardings = state_shardings(mesh, specs)
  # Each worker's gradient is whole (its ZeRO split, if any, would be over the workers).
  stacked_shardings = named(mesh, jax.tree.map(lambda s: P(DATA_AXES, *s), specs.tensor_parallel,
                                               is_leaf=lambda x: isinstance(x, P)))
  local_grad_shardings = named(mesh, specs.tensor_parallel)
  exact = kind in optimizer.exact_kinds

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    # The 1-bit family updates on device (``HOST_UPDATE_OPTIMIZERS`` says why).
    state = _on_device(state) if specs.offloaded else state
    rngs = step_rngs(state.rng, state.step)
    model_kwargs = {**dropping.model_kwargs(kept, state.step), "step": state.step}
    per_worker = jax.tree.map(lambda x: x.reshape(world, -1, *x.shape[1:]), batch)
    own_params = optimizer.worker_params(state.params, state.opt_state, kind)

    def worker(params, batch, index):
      with nn.logical_axis_rules(compute_rules(batch_axes=None)):
        return _accumulate(grad_fn, params, batch, fold_rngs(rngs, index), microbatches,
                           deterministic, local_grad_shardings, model_kwargs)

    params_axis = None if own_params is None else 0
    objectives, sums, grads = jax.vmap(worker, in_axes=(params_axis, 0, 0),
                                        spmd_axis_name=DATA_AXES)(
        state.params if own_params is None else own_params, per_worker, jnp.arange(world))
    sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
    count = sums["tokens"]
    grads = jax.tree.map(lambda g: g * (world / count), grads)
    grads = jax.lax.with_sharding_constraint(grads, stacked_shardings)
    if exact:
      grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
      grad_norm = optax.tree.norm(grads)
    elif kind in optimizer.local_kinds:
      local_sq = sum(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
                     for g in jax.tree.leaves(grads))
      grad_norm = jnp.sqrt(jnp.mean(local_sq))
    else:
      grad_norm = mean_norm_estimate(grads)
    grads = _clip(grads, grad_norm, grad_clip)
    lr = schedule(_schedule_time(state, lr_unit))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, kind=kind,
                                          learning_rate=lr)
    params = jax.tree.map(jnp.add, state.params, updates)
    return _finish(state, params, opt_state, jnp.sum(objectives) / count, grad_norm, lr, sums,
                   batch, dropping.layer_tokens(kept, *batch["inputs"].shape),
                   expert_bias_rate=expert_bias_rate)

  return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(model: nn.Module, specs: StateSpecs, mesh: Mesh,
                   dense_interceptor: DenseInterceptorAt | None = None):
  """``eval_step(params, batch) -> (cross-entropy sum, token_count)``, jitted."""
  loss_sum = intercepted(loss_sum_fn(model), dense_interceptor)

  def evaluate(params, batch: Batch):
    with nn.logical_axis_rules(compute_rules()), use_abstract_mesh(mesh.abstract_mesh):
      sums = loss_sum(params, batch, None, True)[1]
    return sums["loss_sum"], sums["tokens"]

  return jax.jit(evaluate, in_shardings=(state_shardings(mesh, specs).params,
                                         batch_sharding(mesh)))
