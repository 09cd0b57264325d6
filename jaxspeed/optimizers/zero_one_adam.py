"""0/1 Adam (Lu et al. 2022, arXiv 2202.06009, Alg. 1 as coded in DeepSpeed).

Phase 1, adaptive variance freezing (updates t ≤ ``var_freeze_step``): on
*variance steps* the gradient is exactly averaged and both m and v are
updated; on all other steps the gradient itself is averaged with the 1-bit
all-reduce (error feedback) and only m is updated. Variance steps are those
with t % interval == 0, where the interval starts at 1 and doubles after every
``var_update_scaler`` variance steps.

Phase 2, 1-bit synchronization with local steps (t > ``var_freeze_step``):
v is frozen and each worker takes local Adam steps with its own momentum,
accumulating its update u_w = −Σ lr·m_w/(√v + ε) and the sum of learning
rates. On *sync steps* (t % interval == 0) the accumulated updates, rescaled
by √v + ε, are averaged with the 1-bit all-reduce, the momentum is
reconstructed as m = −ū/Σlr, and every worker moves from the last
synchronized parameters by ū/(√v + ε). The interval doubles every ``local_step_scaler``
phase-2 steps, up to ``local_step_clipper`` (DeepSpeed's code uses the clipper
as the largest interval, not as an exponent as its docs say).

Representation: ``TrainState.params`` holds the last synchronized parameters;
the per-worker momentum and accumulated update carry a leading worker axis, so
worker w's parameters during local steps are ``params + u[w]``. Every
1-bit average is masked where v = 0 (``mask_unseen``). The error
buffers are zeroed once when phase 2 starts (they then compress a different
quantity); with one worker nothing is compressed (the 1-bit averages are
exact, as in DeepSpeed at world size 1). DeepSpeed's ``bias_correction``
flag is ignored by its 0/1 Adam; it is not offered here.

Weight decay, unlike DeepSpeed: in phase 2 the decoupled decay multiplies the
synchronized parameters and each u_w by (1 − lr·wd) every step — so worker
parameters decay exactly as under Adam — and is kept out of u. DeepSpeed adds
wd·p to u, which puts wd·p·(√v + ε) into the compressed message and into the
reconstructed momentum at every sync, compounding the decay about 1/(1 − β1)
times; on the tiny GPT with wd = 0.1 that diverged.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxspeed.comm.workers import Errors, WorkerGroup
from jaxspeed.optimizers.base import (
  CommunicatingOptimizer,
  decay_rates,
  decay_term,
  mask_unseen,
  zeros_like_f32,
)
from jaxspeed.optimizers.config import OptimConfig

VARIANCE = "variance"  # phase 1, exact all-reduce, m and v updated
ONEBIT_GRADIENT = "onebit_gradient"  # phase 1, 1-bit all-reduce of the gradient, m updated
LOCAL = "local"  # phase 2, no communication
SYNC = "sync"  # phase 2, local step then 1-bit all-reduce of the accumulated update


class ZeroOneAdamState(NamedTuple):
  count: jax.Array  # int32 []
  mu: Any  # [P, ...] per-worker momentum (rows agree during phase 1)
  nu: Any  # like params
  accumulated: Any  # [P, ...] per-worker update since the last sync (u in the paper)
  lr_sum: jax.Array  # float32 [], sum of learning rates since the last sync
  errors: Errors


def zero_one_kinds(num_steps: int, var_freeze_step: int, var_update_scaler: int,
                   local_step_scaler: int, local_step_clipper: int) -> list[str]:
  """The communication kind of each of the first ``num_steps`` updates (t = 1, 2, ...)."""
  kinds = []
  var_interval, var_counter = 1, 0
  local_interval, local_counter = 1, 0
  for t in range(1, num_steps + 1):
    if t <= var_freeze_step:
      variance_step = t % var_interval == 0
      kinds.append(VARIANCE if variance_step else ONEBIT_GRADIENT)
      if variance_step:
        var_counter += 1
        if var_counter == var_update_scaler:
          var_counter, var_interval = 0, var_interval * 2
    else:
      kinds.append(SYNC if t % local_interval == 0 else LOCAL)
      local_counter += 1
      if local_counter == local_step_scaler:
        local_counter, local_interval = 0, min(local_step_clipper, local_interval * 2)
  return kinds


def zero_one_adam(group: WorkerGroup, var_freeze_step: int, b1: float = 0.9,
                  b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, mask=None,
                  var_update_scaler: int = 16, local_step_scaler: int = 32678,
                  local_step_clipper: int = 16) -> CommunicatingOptimizer:
  """0/1 Adam over ``group``'s workers (DeepSpeed's defaults, its 32678 typo included)."""
  OptimConfig(name="zero_one_adam", var_freeze_step=var_freeze_step, b1=b1, b2=b2, eps=eps,
              weight_decay=weight_decay, var_update_scaler=var_update_scaler,
              local_step_scaler=local_step_scaler,
              local_step_clipper=local_step_clipper)  # checks the arguments
  schedule = functools.partial(zero_one_kinds, var_freeze_step=var_freeze_step,
                               var_update_scaler=var_update_scaler,
                               local_step_scaler=local_step_scaler,
                               local_step_clipper=local_step_clipper)
  known: list[str] = []

  def kind_at(step: int) -> str:
    if step >= len(known):
      known[:] = schedule(max(2 * step, 1024))
    return known[step]

  def stacked_zeros(params):
    return jax.tree.map(lambda p: jnp.zeros((group.world, *p.shape), jnp.float32), params)

  def init(params) -> ZeroOneAdamState:
    return ZeroOneAdamState(jnp.zeros((), jnp.int32), stacked_zeros(params),
                            zeros_like_f32(params), stacked_zeros(params),
                            jnp.zeros((), jnp.float32), group.error_feedback(params))

  def worker_params(params, state: ZeroOneAdamState, kind: str):
    if kind not in (LOCAL, SYNC):
      return None
    return jax.tree.map(lambda p, u: p[None] + u, params, state.accumulated)

  def adam_direction(m, v, d):
    return m / (jnp.sqrt(v) + eps) + d

  def phase1(grads, state: ZeroOneAdamState, params, kind, learning_rate):
    if kind == VARIANCE:
      mean, errors = grads, state.errors
      nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    else:
      mean, errors = group.compressed_mean(grads, state.errors)
      nu = state.nu
      mean = mask_unseen(mean, nu)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g[None], state.mu, mean)
    decay = decay_term(params, mask, weight_decay)
    updates = jax.tree.map(lambda m, v, d: -learning_rate * adam_direction(m, v, d),
                           group.identical_rows(mu), nu, decay)
    return updates, state._replace(count=state.count + 1, mu=mu, nu=nu, errors=errors)

  def phase2(grads, state: ZeroOneAdamState, params, kind, learning_rate):
    count = state.count + 1
    errors = jax.tree.map(lambda e: jnp.where(count == var_freeze_step + 1, 0.0, e),
                          state.errors)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    denom = jax.tree.map(lambda v: jnp.sqrt(v) + eps, state.nu)
    # Decoupled weight decay shrinks the synchronized parameters and each worker's
    # accumulated update alike, so p_w = params + u_w decays exactly as in Adam, and
    # only the Adam direction is compressed (see the module docstring).
    rates = decay_rates(params, mask, weight_decay)
    accumulated = jax.tree.map(
        lambda u, r, m, dn: u * (1 - learning_rate * r) - learning_rate * m / dn[None],
        state.accumulated, rates, mu, denom)
    decayed = jax.tree.map(lambda p, r: -learning_rate * r * p, params, rates)
    lr_sum = state.lr_sum + learning_rate
    if kind == LOCAL:
      return decayed, state._replace(count=count, mu=mu, accumulated=accumulated,
                                     lr_sum=lr_sum, errors=errors)
    scaled = jax.tree.map(lambda u, d: u * d[None], accumulated, denom)
    mean, errors = group.compressed_mean(scaled, errors)
    mean = mask_unseen(mean, state.nu)
    mu = jax.tree.map(lambda m, u: jnp.broadcast_to(-u / lr_sum, m.shape), mu, mean)
    updates = jax.tree.map(lambda d, u, dn: d + u / dn, decayed, mean, denom)
    return updates, state._replace(count=count, mu=mu,
                                   accumulated=jax.tree.map(jnp.zeros_like, accumulated),
                                   lr_sum=jnp.zeros((), jnp.float32), errors=errors)

  def update(grads, state: ZeroOneAdamState, params, *, kind: str, learning_rate):
    step = phase1 if kind in (VARIANCE, ONEBIT_GRADIENT) else phase2
    return step(grads, state, params, kind, learning_rate)

  def state_specs(param_specs, opt_param_specs) -> ZeroOneAdamState:
    stacked = jax.tree.map(group.stacked_spec, param_specs, is_leaf=lambda x: isinstance(x, P))
    return ZeroOneAdamState(P(), stacked, opt_param_specs, stacked, P(),
                            group.error_feedback_specs(param_specs))

  return CommunicatingOptimizer(init, update, kind_at, frozenset({VARIANCE}), state_specs,
                                worker_params, frozenset({LOCAL}))
