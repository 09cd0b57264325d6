"""Expert MLPs applied to routed tokens: capacity buffers (einsums) or grouped rows (ragged_dot).

The dropless exchange that feeds ``grouped_mlp`` is ``jaxspeed.moe.dropless``.

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


def grouped_mlp(rows: jax.Array, group_sizes: jax.Array, group_ids: jax.Array,
                w: ExpertWeights, *, reduce_hidden: Exchange = _identity) -> jax.Array:
  """Expert MLPs over rows sorted by expert, by grouped matmul (``jax.lax.ragged_dot``).

  Args:
    rows: [N, d], the rows of expert 0 first, then expert 1, ...; rows past
      Σ group_sizes are padding (their output is unused).
    group_sizes: [E] int32 rows of each expert.
    group_ids: [N] int32 expert of each row, in [0, E).
    w: the E experts' weights.
    reduce_hidden: sums partial outputs of a d_ff split over tensor parallelism.

  Returns:
    [N, d], row n through expert ``group_ids[n]``.
  """
  h = jax.lax.ragged_dot(rows, w.wi, group_sizes) + w.wi_bias[group_ids]
  y = reduce_hidden(jax.lax.ragged_dot(jax.nn.gelu(h), w.wo, group_sizes))
  return y + w.wo_bias[group_ids]
