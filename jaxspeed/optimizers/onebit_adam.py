"""1-bit Adam (Tang et al. 2021, arXiv 2102.02888, Alg. 1).

Warm-up (the first ``freeze_step`` updates): Adam on exactly averaged
gradients, with DeepSpeed's update u = m/(√v + ε) + wd·p (no bias correction
unless ``bias_correction=True``). Afterwards the variance v is frozen and each
worker folds its *local* gradient into the momentum,
m_w = β1·m + (1−β1)·g_w, which is averaged with the error-compensated 1-bit
all-reduce (one scale per tensor) and masked where v = 0 (``mask_unseen``);
the update formula is unchanged. With one worker nothing is compressed (as
in DeepSpeed, which skips the compressed all-reduce at world size 1): the
update is Adam with the variance frozen after ``freeze_step``, exactly.

Beyond DeepSpeed: the error-feedback buffers are part of the optimizer state
(checkpointed and restored, where DeepSpeed resets them), and the state may
be ZeRO-1 sharded. DeepSpeed's dummy first step, which discards a batch, is
not needed here: buffers exist from ``init``.
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
  shared_params,
  zeros_like_f32,
)
from jaxspeed.optimizers.config import OptimConfig

WARMUP = "warmup"
COMPRESSED = "compressed"


class OneBitAdamState(NamedTuple):
  count: jax.Array  # int32 [], updates done
  mu: Any  # momentum, like params
  nu: Any  # variance, like params (frozen after the warm-up)
  errors: Errors  # one ErrorFeedback per tensor, [rows, n_pad] and [rows, n_pad / P]


def onebit_adam(group: WorkerGroup, freeze_step: int, b1: float = 0.9, b2: float = 0.999,
                eps: float = 1e-8, weight_decay: float = 0.0, mask=None,
                bias_correction: bool = False) -> CommunicatingOptimizer:
  """1-bit Adam over ``group``'s workers.

  Args:
    group: the data-parallel workers.
    freeze_step: number of warm-up updates (DeepSpeed: 15–25% of the run).
    b1, b2, eps: Adam's coefficients.
    weight_decay: decoupled weight decay added to the update.
    mask: pytree of bools (or ``params -> pytree``) selecting decayed tensors.
    bias_correction: divide m by 1−β1^t and v by 1−β2^min(t, freeze_step).
  """
  OptimConfig(name="onebit_adam", freeze_step=freeze_step, b1=b1, b2=b2, eps=eps,
              weight_decay=weight_decay)  # checks the arguments

  def init(params) -> OneBitAdamState:
    zeros = zeros_like_f32(params)
    return OneBitAdamState(jnp.zeros((), jnp.int32), zeros, zeros, group.error_feedback(params))

  def kind_at(step: int) -> str:
    return WARMUP if step < freeze_step else COMPRESSED

  def update(grads, state: OneBitAdamState, params, *, kind: str, learning_rate):
    count = state.count + 1
    if kind == WARMUP:
      mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
      nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
      errors = state.errors
    else:
      local = jax.tree.map(lambda m, g: b1 * m[None] + (1 - b1) * g, state.mu, grads)
      mu, errors = group.compressed_mean(local, state.errors)
      nu = state.nu
      mu = mask_unseen(mu, nu)
    m_hat, v_hat = mu, nu
    if bias_correction:
      t = count.astype(jnp.float32)
      t_frozen = jnp.minimum(t, freeze_step)
      m_hat = jax.tree.map(lambda m: m / (1 - b1**t), mu)
      v_hat = jax.tree.map(lambda v: v / (1 - b2**t_frozen), nu)
    decay = decay_term(params, mask, weight_decay)
    updates = jax.tree.map(lambda m, v, d: -learning_rate * (m / (jnp.sqrt(v) + eps) + d),
                           m_hat, v_hat, decay)
    return updates, OneBitAdamState(count, mu, nu, errors)

  def state_specs(param_specs, opt_param_specs) -> OneBitAdamState:
    return OneBitAdamState(P(), opt_param_specs, opt_param_specs,
                           group.error_feedback_specs(param_specs))

  return CommunicatingOptimizer(init, update, kind_at, frozenset({WARMUP}), state_specs,
                                shared_params)
