"""Optimizers and learning-rate schedules from ``config.optim``.

Optimizers are built at unit learning rate; the train step multiplies their
update by ``lr = schedule(t)``. That lets one schedule be driven by either the
step count or the number of tokens seen (sequence-length curricula change the
tokens per step), and works for any optax transform, since every optax
optimizer's update is linear in its learning rate (AdamW's decoupled weight
decay included).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxspeed.comm import WorkerGroup
from jaxspeed.optimizers import CommunicatingOptimizer, onebit_adam, onebit_lamb, zero_one_adam
from jaxspeed.optimizers.config import ONEBIT_OPTIMIZERS, OPTIMIZERS

Schedule = Callable[[jax.Array], jax.Array]

NO_DECAY_NAMES = ("bias", "scale")  # biases and LayerNorm gains are not weight-decayed


def decay_mask(params):
  """True for parameters that take weight decay (matrices and embeddings)."""
  def keep(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return not any(tag in name for tag in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim: ml_collections.ConfigDict, group: WorkerGroup | None = None
                   ) -> optax.GradientTransformation | CommunicatingOptimizer:
  """The optimizer named by ``optim.name``.

  optax optimizers are built at learning rate 1 (the step scales them); the
  1-bit family communicates over ``group`` and applies the learning rate itself.
  """
  if optim.name in ONEBIT_OPTIMIZERS:
    if group is None:
      raise ValueError(f"optim.name={optim.name!r} needs the WorkerGroup it communicates over")
    adam_args = dict(b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                     mask=decay_mask)
    if optim.name == "onebit_adam":
      return onebit_adam(group, optim.freeze_step, bias_correction=optim.bias_correction,
                         **adam_args)
    if optim.name == "onebit_lamb":
      return onebit_lamb(group, optim.freeze_step, max_coeff=optim.max_coeff,
                         min_coeff=optim.min_coeff, coeff_beta=optim.coeff_beta,
                         factor_max=optim.factor_max, factor_min=optim.factor_min,
                         factor_threshold=optim.factor_threshold, **adam_args)
    return zero_one_adam(group, optim.var_freeze_step,
                         var_update_scaler=optim.var_update_scaler,
                         local_step_scaler=optim.local_step_scaler,
                         local_step_clipper=optim.local_step_clipper, **adam_args)
  if optim.name == "adamw":
    return optax.adamw(1.0, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.name == "adam":
    return optax.adam(1.0, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  if optim.name == "lamb":
    return lamb(b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  if optim.name == "sgd":
    return optax.sgd(1.0, momentum=optim.momentum or None)
  raise ValueError(f"optim.name={optim.name!r}; allowed: {', '.join(OPTIMIZERS)}")


def scale_by_trust_ratio() -> optax.GradientTransformation:
  """LAMB's layer-wise trust ratio ‖p‖ / ‖u‖ (You et al. 2020, Alg. 2), 1 where either is 0.

  Written out rather than ``optax.scale_by_trust_ratio``: optax's ``safe_norm``
  builds a ``ones_like`` array, which JAX places in device memory even inside a
  host computation, so optax's LAMB cannot run under ZeRO-Offload's host update.
  """
  def scale(update, param):
    param_norm = jnp.sqrt(jnp.sum(jnp.square(param)))
    update_norm = jnp.sqrt(jnp.sum(jnp.square(update)))
    both = (param_norm > 0) & (update_norm > 0)
    return update * jnp.where(both, param_norm / jnp.where(both, update_norm, 1.0), 1.0)

  def update_fn(updates, state, params):
    return jax.tree.map(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def lamb(b1: float, b2: float, eps: float, weight_decay: float) -> optax.GradientTransformation:
  """optax's LAMB at unit learning rate, with ``scale_by_trust_ratio`` (same values)."""
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                     optax.add_decayed_weights(weight_decay, decay_mask),
                     scale_by_trust_ratio(), optax.scale(-1.0))


def make_schedule(optim: ml_collections.ConfigDict, total: float) -> Schedule:
  """Linear warmup to ``learning_rate``, then cosine/linear decay or constant.

  Args:
    optim: ``config.optim``; ``warmup`` and ``decay`` are in ``optim.lr_unit``.
    total: the run's length in the same unit, used when ``optim.decay`` is 0.

  Returns:
    ``t -> lr`` for ``t`` in steps or tokens.
  """
  peak = optim.learning_rate
  warmup = float(optim.warmup)
  decay = float(optim.decay or max(total - warmup, 1.0))
  floor = peak * optim.min_lr_ratio

  def schedule(t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    ramp = peak * jnp.minimum(1.0, (t + 1.0) / max(warmup, 1.0))
    frac = jnp.clip((t - warmup) / decay, 0.0, 1.0)
    if optim.schedule == "cosine":
      after = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif optim.schedule == "linear":
      after = peak + (floor - peak) * frac
    else:
      after = jnp.asarray(peak, jnp.float32)
    return jnp.where(t < warmup, ramp, after)

  return schedule
