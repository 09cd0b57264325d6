"""The jitted train and eval steps: ``step(state, batch) -> (state, metrics)``.

A batch is a dict of [B, S] arrays: ``inputs`` and ``targets`` (int32), and
optionally ``loss_mask`` (float32, 1 where the target counts) and model
keyword inputs (``positions``, ``token_types``, ``padding_mask``). B is the
global batch, split over the data axes.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxspeed.parallel.mesh import DATA_AXES
from jaxspeed.parallel.rules import compute_rules, named
from jaxspeed.training.optim import Schedule
from jaxspeed.training.state import StateSpecs, TrainState

MODEL_KWARGS = ("positions", "token_types", "padding_mask")
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy, written so a vocab-split ``logits`` stays split.

  The target logit is picked with a masked sum instead of a gather, so under
  tensor parallelism each device reduces its own vocabulary slice and XLA adds
  one all-reduce of [B, S] values (Megatron's vocab-parallel cross-entropy).

  Args:
    logits: [B, S, V] float32.
    targets: [B, S] int.
    mask: [B, S], 1 where the token counts; all ones if None.

  Returns:
    (sum of losses over counted tokens, number of counted tokens).
  """
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  target_logit = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
  losses = jax.nn.logsumexp(logits, axis=-1) - target_logit
  mask = jnp.ones_like(losses) if mask is None else mask.astype(losses.dtype)
  return jnp.sum(losses * mask), jnp.sum(mask)


def loss_sum_fn(model: nn.Module) -> Callable:
  """``(params, batch, rng, deterministic) -> (loss_sum, token_count)``."""
  def loss_sum(params, batch: Batch, rng, deterministic: bool):
    kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
    logits = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng}, **kwargs)
    return cross_entropy(logits, batch["targets"], batch.get("loss_mask"))
  return loss_sum


def split_microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B/num, ...] without moving data between devices.

  Microbatch m takes rows m, m + num, m + 2·num, ...: every device's contiguous
  block of rows holds an equal share of each microbatch.
  """
  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows split over ``data`` x ``fsdp``, replicated over the other axes."""
  return NamedSharding(mesh, P(DATA_AXES))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    schedule: Schedule, specs: StateSpecs, mesh: Mesh, *,
                    microbatches: int = 1, lr_unit: str = "steps",
                    grad_clip: float = 0.0, deterministic: bool = True):
  """Builds ``train_step(state, batch) -> (state, metrics)``, jitted with shardings.

  One optimizer step per call: gradients of the token-mean loss over the whole
  global batch (accumulated over ``microbatches``), clipped by global norm,
  optimizer update scaled by ``schedule``. A step whose loss or gradient norm
  is not finite leaves parameters and optimizer state untouched and counts
  itself in ``state.skipped``.
  """
  loss_sum = loss_sum_fn(model)
  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
  grad_shardings = named(mesh, specs.grads)
  update_shardings = named(mesh, specs.update)
  state_shardings = named(mesh, specs.state)

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(state.rng, state.step)
    with nn.logical_axis_rules(compute_rules()):
      if microbatches == 1:
        (total_loss, count), grads = grad_fn(state.params, batch, rng, deterministic)
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
      else:
        def accumulate(carry, xs):
          index, micro = xs
          acc, loss_acc, count_acc = carry
          (loss, n), g = grad_fn(state.params, micro, jax.random.fold_in(rng, index),
                                 deterministic)
          acc = jax.tree.map(jnp.add, acc, g)
          acc = jax.lax.with_sharding_constraint(acc, grad_shardings)
          return (acc, loss_acc + loss, count_acc + n), None

        zeros = jax.lax.with_sharding_constraint(
            jax.tree.map(jnp.zeros_like, state.params), grad_shardings)
        micro = split_microbatches(batch, microbatches)
        (grads, total_loss, count), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)),
            (jnp.arange(microbatches), micro))

    grads = jax.tree.map(lambda g: g / count, grads)
    grads = jax.lax.with_sharding_constraint(grads, update_shardings)
    loss = total_loss / count
    grad_norm = optax.tree.norm(grads)
    if grad_clip > 0:
      factor = jnp.minimum(1.0, grad_clip / (grad_norm + 1e-6))
      grads = jax.tree.map(lambda g: g * factor, grads)

    tokens = state.tokens + batch["inputs"].size
    lr = schedule(state.step if lr_unit == "steps" else state.tokens)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    updates = jax.lax.with_sharding_constraint(updates, update_shardings)
    params = jax.tree.map(lambda p, u: p + lr * u, state.params, updates)

    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        tokens=tokens,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        rng=state.rng,
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr,
               "skipped_steps": new_state.skipped, "tokens": count}
    return new_state, metrics

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def make_eval_step(model: nn.Module, specs: StateSpecs, mesh: Mesh):
  """``eval_step(params, batch) -> (loss_sum, token_count)``, jitted."""
  loss_sum = loss_sum_fn(model)

  def evaluate(params, batch: Batch):
    with nn.logical_axis_rules(compute_rules()):
      return loss_sum(params, batch, None, True)

  return jax.jit(evaluate, in_shardings=(named(mesh, specs.state.params), batch_sharding(mesh)))
