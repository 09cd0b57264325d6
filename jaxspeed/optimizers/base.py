"""The interface of optimizers that do their own data-parallel communication.

An optax optimizer receives the gradient already averaged over data-parallel
workers. The 1-bit family cannot: what it communicates (compressed momentum,
compressed gradients, accumulated updates, or nothing on a local step) depends
on the step. A ``CommunicatingOptimizer`` therefore receives each worker's
local gradient as one array with a leading worker axis, ``[P, ...]``, and
averages what it needs through its ``WorkerGroup``.

Each step does one *kind* of communication (e.g. ``warmup`` = exact all-reduce,
``compressed`` = 1-bit), a pure function of the step index known on the host,
so the train step compiles one program per kind: a phase change costs one
compilation, and each kind's collectives can be read from its HLO.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any


class CommunicatingOptimizer(NamedTuple):
  """An optax-style ``(init, update)`` pair that owns gradient communication.

  Attributes:
    init: ``params -> state``.
    update: ``(grads, state, params, *, kind, learning_rate) -> (updates, state)``.
      ``grads`` is the exact worker-mean gradient (same shapes as ``params``)
      when ``kind in exact_kinds``, else the per-worker gradients ``[P, ...]``.
      ``updates`` already include the learning rate: ``params + updates``.
    kind_at: ``step -> kind`` for the 0-based step index (host-side).
    exact_kinds: the kinds that take the exactly averaged gradient.
    state_specs: ``(param_specs, opt_param_specs) -> state PartitionSpecs``,
      given the parameters' tensor-parallel specs and the specs of
      parameter-shaped optimizer state (ZeRO-1 split or not).
    worker_params: ``(params, state, kind) -> [P, ...] params or None``: each
      worker's own parameters on steps where they differ (local steps).
    local_kinds: the kinds that communicate nothing (0/1 Adam's local steps).
  """

  init: Callable[[Params], Any]
  update: Callable[..., tuple[Params, Any]]
  kind_at: Callable[[int], str]
  exact_kinds: frozenset[str]
  state_specs: Callable[[Any, Any], Any]
  worker_params: Callable[[Params, Any, str], Params | None]
  local_kinds: frozenset[str] = frozenset()


def shared_params(params, state, kind) -> None:
  """``worker_params`` for optimizers whose workers always share parameters."""
  del params, state, kind


def zeros_like_f32(tree):
  return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def scalars_like(tree, value: float):
  """One float32 scalar per leaf (per-tensor coefficients)."""
  return jax.tree.map(lambda _: jnp.full((), value, jnp.float32), tree)


def decay_rates(params, mask, weight_decay: float):
  """Per tensor, ``weight_decay`` where ``mask`` is True (or None), else 0."""
  mask = mask(params) if callable(mask) else mask
  if mask is None:
    return jax.tree.map(lambda _: weight_decay, params)
  return jax.tree.map(lambda _, m: weight_decay if m else 0.0, params, mask)


def decay_term(params, mask, weight_decay: float):
  """``weight_decay · p`` where ``mask`` is True, else 0 (decoupled, added to the update)."""
  return jax.tree.map(lambda p, r: r * p, params, decay_rates(params, mask, weight_decay))


def mask_unseen(values, nu):
  """Zeroes ``values`` where the (frozen) variance is exactly 0.

  1-bit compression cannot represent exact zeros: an element that never had a
  gradient (an unused embedding row) decompresses to ±scale, and divided by
  √v + ε = ε it would move by scale/ε. DeepSpeed asks the user for an
  ``exp_avg_mask``; here the mask is read from the variance itself.
  """
  return jax.tree.map(lambda x, v: jnp.where(v > 0, x, 0.0), values, nu)
