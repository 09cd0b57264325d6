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


def _rank_within(dest: jax.Array, num_shards: int) -> jax.Array:
  """[A] destination of each assignment → its 0-based rank among those with the same one."""
  onehot = jax.nn.one_hot(dest, num_shards, dtype=jnp.int32)  # [A, ep]
  return jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)


def dropless_experts(x: jax.Array, experts: jax.Array, weights: jax.Array,
                     w: ExpertWeights, *, num_shards: int = 1, send: Exchange = _identity,
                     receive: Exchange = _identity,
                     reduce_hidden: Exchange = _identity) -> jax.Array:
  """Every token through its k experts, none dropped: exchange, sort, grouped matmul, unsort.

  Each (token, choice) assignment goes to the shard holding its expert (global
  expert e lives on shard e // E_local as local expert e % E_local). The send
  buffer holds R = T · min(k, E_local) rows per destination shard: a token's k
  experts are distinct, so at most min(k, E_local) of them live on one shard,
  and R rows fit every assignment even when all T tokens pick the same shard.
  That static bound replaces DeepSpeed's ``drop_tokens=False`` capacity (the
  largest expert count, all-reduced with MAX over the expert-parallel group),
  which is dynamic and so has no fixed-shape equivalent under ``jit``. On the
  receiving shard the rows of all sources are sorted by local expert and run
  through ``jax.lax.ragged_dot`` (no padding to the largest expert there), then
  returned to their sources and combined with their gate weights.

  Args:
    x: [T, d] tokens of this shard.
    experts: [T, k] int chosen global experts; weights: [T, k] combine weights.
    w: the weights of the E_local = E / num_shards experts held here.
    num_shards: expert-parallel shards (1 on one device).
    send: [ep, R, d] (or [ep, R]) rows by destination → rows by source, the
      expert-parallel all-to-all (identity on one device); receive: its inverse.
    reduce_hidden: sums the partial outputs of a d_ff split over tensor
      parallelism (identity without it).

  Returns:
    [T, d] = Σ_j weights[t, j] · expert_{experts[t, j]}(x[t]).
  """
  num_local, (tokens, k) = w.wi.shape[0], experts.shape
  rows_per_shard = tokens * min(k, num_local)
  flat = experts.reshape(-1)  # [A = T·k]
  token = jnp.arange(flat.shape[0]) // k
  dest, local = flat // num_local, flat % num_local
  rank = _rank_within(dest, num_shards)
  buffer = jnp.zeros((num_shards, rows_per_shard, x.shape[-1]), x.dtype)
  buffer = send(buffer.at[dest, rank].set(x[token]))
  ids = jnp.full((num_shards, rows_per_shard), num_local, jnp.int32)  # num_local: padding
  ids = send(ids.at[dest, rank].set(local.astype(jnp.int32))).reshape(-1)
  order = jnp.argsort(ids, stable=True)  # padding rows last
  sizes = jnp.bincount(ids, length=num_local).astype(jnp.int32)  # ignores the padding id
  y = grouped_mlp(buffer.reshape(-1, x.shape[-1])[order], sizes,
                  jnp.minimum(ids[order], num_local - 1), w, reduce_hidden=reduce_hidden)
  y = receive(jnp.zeros_like(y).at[order].set(y).reshape(buffer.shape))
  y = y[dest, rank] * weights.reshape(-1)[:, None].astype(y.dtype)
  return jnp.zeros_like(x).at[token].add(y)
