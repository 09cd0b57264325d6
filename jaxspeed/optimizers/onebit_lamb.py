"""1-bit LAMB (Li et al. 2021, arXiv 2104.06069, Alg. 1).

Warm-up (the first ``freeze_step`` updates): LAMB without bias correction on
exactly averaged gradients. Per tensor, u = m/(√v + ε) + wd·p and the trust
ratio c = ‖p‖/‖u‖ clipped to [min_coeff, max_coeff] (1 if either norm is 0);
an EMA of c (``coeff_beta``, starting at 0, not bias-corrected, updated only
when c ≠ 1) is frozen for the compression stage.

Compression stage: v is frozen; at its first step every tensor's momentum RMS
sᵢ sets a fixed scaling coefficient mean(s)/sᵢ, so all momenta (fused into one
flat buffer with one 1-bit scale) have comparable magnitudes. Each step
reconstructs the averaged gradient ĝ = (m − β1·m_prev)/(1 − β1), tracks a
fresh variance v_fresh with it, and multiplies the frozen coefficient by
factor = max((√v + ε)/(√v_fresh + ε)), mixed with ‖u_prelim‖/‖u‖ under weight
decay, clipped to [factor_min, factor_max] and to ±factor_threshold of the
previous factor. With one worker the momentum is not compressed (as in
DeepSpeed at world size 1), so only the frozen variance and the factor differ
from LAMB.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxspeed.comm.workers import Errors, WorkerGroup
from jaxspeed.optimizers.base import (
  CommunicatingOptimizer,
  decay_term,
  mask_unseen,
  scalars_like,
  shared_params,
  zeros_like_f32,
)
from jaxspeed.optimizers.config import OptimConfig
from jaxspeed.optimizers.onebit_adam import COMPRESSED, WARMUP


class OneBitLambState(NamedTuple):
  count: jax.Array  # int32 []
  mu: Any  # momentum, like params
  nu: Any  # variance, like params (frozen after the warm-up)
  nu_fresh: Any  # variance tracked from reconstructed gradients after the warm-up
  coeff_freeze: Any  # float32 [] per tensor: EMA of the warm-up trust ratios
  scaling: Any  # float32 [] per tensor: momentum scaling set at the first compressed step
  last_factor: Any  # float32 [] per tensor: previous factor, for the rate limit
  errors: Errors  # one ErrorFeedback for the fused momentum


def _norm(x) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x)))


def onebit_lamb(group: WorkerGroup, freeze_step: int, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8, weight_decay: float = 0.0, mask=None,
                max_coeff: float = 10.0, min_coeff: float = 0.01, coeff_beta: float = 0.9,
                factor_max: float = 4.0, factor_min: float = 0.5,
                factor_threshold: float = 0.1) -> CommunicatingOptimizer:
  """1-bit LAMB over ``group``'s workers (DeepSpeed's defaults)."""
  OptimConfig(name="onebit_lamb", freeze_step=freeze_step, b1=b1, b2=b2, eps=eps,
              weight_decay=weight_decay, max_coeff=max_coeff, min_coeff=min_coeff,
              coeff_beta=coeff_beta, factor_max=factor_max, factor_min=factor_min,
              factor_threshold=factor_threshold)  # checks the arguments

  def init(params) -> OneBitLambState:
    zeros = zeros_like_f32(params)
    return OneBitLambState(jnp.zeros((), jnp.int32), zeros, zeros, zeros,
                           scalars_like(params, 0.0), scalars_like(params, 1.0),
                           scalars_like(params, 1.0), group.error_feedback(params, fused=True))

  def kind_at(step: int) -> str:
    return WARMUP if step < freeze_step else COMPRESSED

  def warmup(grads, state: OneBitLambState, params, learning_rate):
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    nu_fresh = jax.tree.map(lambda v, f: jnp.where(count == freeze_step, v, f), nu, state.nu_fresh)
    u = jax.tree.map(lambda m, v, d: m / (jnp.sqrt(v) + eps) + d, mu, nu,
                     decay_term(params, mask, weight_decay))

    def trust_ratio(p, u):
      p_norm, u_norm = _norm(p), _norm(u)
      c = jnp.clip(p_norm / jnp.where(u_norm > 0, u_norm, 1.0), min_coeff, max_coeff)
      return jnp.where((p_norm > 0) & (u_norm > 0), c, 1.0)

    coeff = jax.tree.map(trust_ratio, params, u)
    coeff_freeze = jax.tree.map(
        lambda f, c: jnp.where(c != 1.0, coeff_beta * f + (1 - coeff_beta) * c, f),
        state.coeff_freeze, coeff)
    updates = jax.tree.map(lambda c, u: -learning_rate * c * u, coeff, u)
    return updates, state._replace(count=count, mu=mu, nu=nu, nu_fresh=nu_fresh,
                                   coeff_freeze=coeff_freeze)

  def compressed(grads, state: OneBitLambState, params, learning_rate):
    count = state.count + 1
    first = count == freeze_step + 1
    rms = jax.tree.map(lambda m: _norm(m) / jnp.sqrt(m.size), state.mu)
    mean_rms = sum(jax.tree.leaves(rms)) / len(jax.tree.leaves(rms))
    scaling = jax.tree.map(
        lambda s, old: jnp.where(first, jnp.where(s > 0, mean_rms / s, 1.0), old),
        rms, state.scaling)
    local = jax.tree.map(lambda m, g, s: (b1 * m[None] + (1 - b1) * g) * s,
                         state.mu, grads, scaling)
    mu, errors = group.compressed_mean(local, state.errors, fused=True)
    mu = mask_unseen(jax.tree.map(lambda m, s: m / s, mu, scaling), state.nu)
    grad = jax.tree.map(lambda m, prev: (m - b1 * prev) / (1 - b1), mu, state.mu)
    nu_fresh = jax.tree.map(lambda f, g: b2 * f + (1 - b2) * g * g, state.nu_fresh, grad)
    denom = jax.tree.map(lambda v: jnp.sqrt(v) + eps, state.nu)
    prelim = jax.tree.map(jnp.divide, mu, denom)
    u = jax.tree.map(jnp.add, prelim, decay_term(params, mask, weight_decay))

    def factor(d, f, prelim, u, last):
      value = jnp.max(d / (jnp.sqrt(f) + eps))
      u_norm = _norm(u)
      ratio = jnp.minimum(1.0, _norm(prelim) / jnp.where(u_norm > 0, u_norm, 1.0))
      value = value * ratio + (1.0 - ratio)
      value = jnp.clip(value, factor_min, factor_max)
      return jnp.clip(value, last * (1.0 - factor_threshold), last * (1.0 + factor_threshold))

    last_factor = jax.tree.map(factor, denom, nu_fresh, prelim, u, state.last_factor)
    updates = jax.tree.map(lambda c, f, u: -learning_rate * c * f * u,
                           state.coeff_freeze, last_factor, u)
    return updates, state._replace(count=count, mu=mu, nu_fresh=nu_fresh, scaling=scaling,
                                   last_factor=last_factor, errors=errors)

  def update(grads, state: OneBitLambState, params, *, kind: str, learning_rate):
    step = warmup if kind == WARMUP else compressed
    return step(grads, state, params, learning_rate)

  def state_specs(param_specs, opt_param_specs) -> OneBitLambState:
    scalars = jax.tree.map(lambda _: P(), param_specs, is_leaf=lambda x: isinstance(x, P))
    return OneBitLambState(P(), opt_param_specs, opt_param_specs, opt_param_specs, scalars,
                           scalars, scalars, group.error_feedback_specs(param_specs, fused=True))

  return CommunicatingOptimizer(init, update, kind_at, frozenset({WARMUP}), state_specs,
                                shared_params)
