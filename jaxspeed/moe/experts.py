"""Expert MLPs applied to routed tokens: capacity buffers (einsums) or dropless (ragged_dot).

Each expert e is d → d_ff (GELU) → d with weights ``wi`` [E, d, f], ``wi_bias``
[E, f], ``wo`` [E, f, d], ``wo_bias`` [E, d].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class ExpertWeights(NamedTuple):
  wi: jax.Array  # [E, d, f]
  wi_bias: jax.Array  # [E, f]
  wo: jax.Array  # [E, f, d]
  wo_bias: jax.Array  # [E, d]

  def cast(self, dtype) -> ExpertWeights:
    return ExpertWeights(*(w.astype(dtype) for w in self))


Exchange = Callable[[jax.Array], jax.Array]
_identity: Exchange = lambda x: x


def capacity_experts(x: jax.Array, dispatch: jax.Array, combine: jax.Array,
                     w: ExpertWeights, *, send: Exchange = _identity,
                     receive: Exchange = _identity,
                     reduce_hidden: Exchange = _identity) -> jax.Array:
  """GShard dispatch → experts → combine over capacity buffers.

  Args:
    x: [G, S, d] tokens of G groups.
    dispatch: [G, S, E, C] 0/1; combine: [G, S, E, C] weights.
    w: the weights of the experts held here: E_local = E / ep of them.
    send: [E, G, C, d] → [E_local, ep·G, C, d], the expert-parallel all-to-all
      (identity on one device).
    receive: its inverse.
    reduce_hidden: sums the partial outputs of a d_ff split over tensor
      parallelism (identity without it).

  Returns:
    [G, S, d].
  """
  dtype = x.dtype
  buffers = send(jnp.einsum("gsec,gsd->egcd", dispatch.astype(dtype), x))
  h = jnp.einsum("egcd,edf->egcf", buffers, w.wi) + w.wi_bias[:, None, None, :]
  y = reduce_hidden(jnp.einsum("egcf,efd->egcd", jax.nn.gelu(h), w.wo))
  y = receive(y + w.wo_bias[:, None, None, :])
  return jnp.einsum("gsec,egcd->gsd", combine.astype(dtype), y)


def dropless_experts(x: jax.Array, experts: jax.Array, weights: jax.Array,
                     w: ExpertWeights) -> jax.Array:
  """Every token through its k experts: sort by expert, grouped matmul, unsort.

  ``jax.lax.ragged_dot`` multiplies each contiguous run of rows by its group's
  weight matrix, so no capacity buffer (and no drop) is needed, unlike
  DeepSpeed's ``drop_tokens=False``, which pads every expert to the largest
  count.

  Args:
    x: [T, d] tokens.
    experts: [T, k] int chosen experts; weights: [T, k] combine weights.
    w: all E experts' weights.

  Returns:
    [T, d] = Σ_j weights[t, j] · expert_{experts[t, j]}(x[t]).
  """
  num_experts, k = w.wi.shape[0], experts.shape[-1]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sorted_experts = flat[order]
  token = order // k
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  h = jax.lax.ragged_dot(x[token], w.wi, sizes) + w.wi_bias[sorted_experts]
  y = jax.lax.ragged_dot(jax.nn.gelu(h), w.wo, sizes) + w.wo_bias[sorted_experts]
  y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
  return jnp.zeros_like(x).at[token].add(y)
