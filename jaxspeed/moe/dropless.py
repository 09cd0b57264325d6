"""Dropless MoE: every token through its k experts, exchanged between expert-parallel shards.

Each shard routes its own T tokens; global expert e lives on shard e // E_local
as local expert e % E_local. What a shard sends each destination is a *unit*:

* plain dispatch: one unit per (token, choice) assignment;
* deduplicated dispatch (X-MoE's redundancy-bypassing dispatch, Yuan et al.
  2025, §4): one unit per (token, destination shard) pair. A token whose k
  experts include several on one shard crosses once; the destination fans it
  out to those experts (the combine weights travel with it), sums their
  weighted outputs, and returns one row.

Units are exchanged in a fixed-size all-to-all buffer of ``rows`` units per
destination (XLA:CPU cannot run ``jax.lax.ragged_all_to_all``, and ``jit``
shapes are static). The exact bound, room for every unit whatever the routing,
is T · min(k, E_local) assignments, or T pairs with deduplication: about ep
times the units of a balanced exchange. Padding-free dispatch (X-MoE's
padding-free training, §3, in static shapes) sizes the buffer at ``slack``
times the balanced share instead, T · k / ep units (T · min(k, ep) / ep pairs),
after reducing the per-destination unit counts with a MAX over the devices:
if any shard would send more than fit, every shard takes the exact buffer
instead (``jax.lax.cond``), so nothing is ever dropped. On the receiving
shard, rows are sorted by local expert and run through ``grouped_mlp``
(``jax.lax.ragged_dot``): each expert's group holds its real rows, with no
padding to the largest expert; the buffer's empty rows sit past every group.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxspeed.moe.experts import Exchange, ExpertWeights, grouped_mlp

_identity: Exchange = lambda x: x


def exact_rows(tokens: int, k: int, num_local: int, dedup: bool) -> int:
  """Units one shard may send one destination, at most: T pairs, or T · min(k, E_local)
  assignments (a token's k experts are distinct, so at most min(k, E_local) share a shard)."""
  return tokens if dedup else tokens * min(k, num_local)


def balanced_rows(tokens: int, k: int, num_shards: int, dedup: bool) -> float:
  """Units per destination when every shard receives the same share: T · k / ep
  assignments, or at most T · min(k, ep) / ep pairs (a token meets ≤ min(k, ep) shards)."""
  return tokens * (min(k, num_shards) if dedup else k) / num_shards


def buffer_rows(tokens: int, k: int, num_local: int, num_shards: int, dedup: bool,
                slack: float | None) -> int:
  """The tight buffer's units per destination: ⌈slack · balanced⌉, at most exact; exact
  without ``slack``."""
  exact = exact_rows(tokens, k, num_local, dedup)
  if slack is None:
    return exact
  return min(exact, math.ceil(slack * balanced_rows(tokens, k, num_shards, dedup)))


class _Units(NamedTuple):
  """Where each (token, choice) assignment travels, by destination buffer row.

  Attributes:
    dest, row, slot: [T, k] destination shard, row of its unit there, and slot of the
      assignment within the unit (0 without deduplication).
    counts: [ep] units for each destination.
  """

  dest: jax.Array
  row: jax.Array
  slot: jax.Array
  counts: jax.Array


def _rank(onehot: jax.Array) -> jax.Array:
  """[N, C] 0/1 → [N, C] 0-based rank of each 1 among the ones of its column, in order."""
  return jnp.cumsum(onehot, axis=0) - 1


def _units(experts: jax.Array, num_local: int, num_shards: int, dedup: bool) -> _Units:
  tokens, k = experts.shape
  dest = experts // num_local
  onehot = jax.nn.one_hot(dest, num_shards, dtype=jnp.int32)  # [T, k, ep]
  if dedup:
    present = jnp.max(onehot, axis=1)  # [T, ep]: the token has an expert on that shard
    row = jnp.take_along_axis(_rank(present), dest, axis=1)
    # The slot of choice j: how many earlier choices of the token went to the same shard.
    slot = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)
    return _Units(dest, row, slot, jnp.sum(present, axis=0))
  flat = onehot.reshape(tokens * k, num_shards)
  row = jnp.sum(_rank(flat) * flat, axis=-1).reshape(tokens, k)
  return _Units(dest, row, jnp.zeros_like(row), jnp.sum(flat, axis=0))


def _exchange(x: jax.Array, experts: jax.Array, weights: jax.Array, w: ExpertWeights,
              units: _Units, rows: int, dedup: bool, send: Exchange, receive: Exchange,
              reduce_hidden: Exchange) -> jax.Array:
  """One dropless pass with buffers of ``rows`` units per destination (all must fit)."""
  (tokens, k), d = experts.shape, x.shape[-1]
  num_local, num_shards = w.wi.shape[0], units.counts.shape[0]
  slots = min(k, num_local) if dedup else 1
  token = jnp.broadcast_to(jnp.arange(tokens)[:, None], (tokens, k))
  # A unit's token is written once: by its first choice (past the end, so dropped, for others).
  row_once = jnp.where(units.slot == 0, units.row, rows)
  buffer = jnp.zeros((num_shards, rows, d), x.dtype)
  buffer = send(buffer.at[units.dest, row_once].set(x[token], mode="drop"))
  ids = jnp.full((num_shards, rows, slots), num_local, jnp.int32)  # num_local: empty slot
  ids = ids.at[units.dest, units.row, units.slot].set((experts % num_local).astype(jnp.int32))
  ids = send(ids if dedup else ids[..., 0]).reshape(-1)  # [ep · rows · slots]
  order = jnp.argsort(ids, stable=True)  # empty slots last
  sizes = jnp.bincount(ids, length=num_local).astype(jnp.int32)  # ignores the empty id
  y = grouped_mlp(buffer.reshape(-1, d)[order // slots], sizes,
                  jnp.minimum(ids[order], num_local - 1), w, reduce_hidden=reduce_hidden)
  y = jnp.zeros_like(y).at[order].set(y)  # [ep · rows · slots, d], back in buffer order
  if dedup:
    # The fan-in on arrival: each unit returns Σ_slots weight · expert output.
    gates = jnp.zeros((num_shards, rows, slots), y.dtype)
    gates = send(gates.at[units.dest, units.row, units.slot].set(weights.astype(y.dtype)))
    y = jnp.sum(y.reshape(-1, slots, d) * gates.reshape(-1, slots, 1), axis=1)
    back = receive(y.reshape(num_shards, rows, d))
    # Each of the token's units once: the first choice that went to each shard.
    first = (units.slot == 0).astype(y.dtype)[..., None]
    return jnp.sum(back[units.dest, units.row] * first, axis=1)
  back = receive(y.reshape(num_shards, rows, d))
  return jnp.sum(back[units.dest, units.row] * weights[..., None].astype(y.dtype), axis=1)


def dropless_experts(x: jax.Array, experts: jax.Array, weights: jax.Array,
                     w: ExpertWeights, *, num_shards: int = 1, dedup: bool = False,
                     slack: float | None = None, send: Exchange = _identity,
                     receive: Exchange = _identity, reduce_hidden: Exchange = _identity,
                     reduce_max: Exchange = _identity) -> tuple[jax.Array, jax.Array]:
  """Every token through its k experts, none dropped: exchange, sort, grouped matmul, return.

  The exact static bound replaces DeepSpeed's ``drop_tokens=False`` capacity (the
  largest expert count, all-reduced with MAX over the expert-parallel group), which is
  dynamic and so has no fixed-shape equivalent under ``jit``.

  Args:
    x: [T, d] tokens of this shard.
    experts: [T, k] int chosen global experts; weights: [T, k] combine weights.
    w: the weights of the E_local = E / num_shards experts held here.
    num_shards: expert-parallel shards (1 on one device).
    dedup: send one unit per (token, destination) instead of per assignment.
    slack: padding-free dispatch: buffers of ``buffer_rows(..., slack)`` units, with
      the exact buffer as fallback; None for the exact buffer always.
    send: [ep, R, ...] rows by destination → rows by source, the expert-parallel
      all-to-all (identity on one device); receive: its inverse.
    reduce_hidden: sums the partial outputs of a d_ff split over tensor parallelism.
    reduce_max: MAX over every device of the program (identity on one device), so that
      all of them agree on the buffer.

  Returns:
    [T, d] = Σ_j weights[t, j] · expert_{experts[t, j]}(x[t]), and a bool [] that is
    True where the padding-free buffers overflowed and the exact ones ran.
  """
  (tokens, k), num_local = experts.shape, w.wi.shape[0]
  units = _units(experts, num_local, num_shards, dedup)
  run = lambda rows: _exchange(x, experts, weights, w, units, rows, dedup, send, receive,
                               reduce_hidden)
  exact = exact_rows(tokens, k, num_local, dedup)
  rows = buffer_rows(tokens, k, num_local, num_shards, dedup, slack)
  if rows >= exact:
    return run(exact), jnp.bool_(False)
  overflow = reduce_max(jnp.max(units.counts)) > rows
  return jax.lax.cond(overflow, lambda: run(exact), lambda: run(rows)), overflow
