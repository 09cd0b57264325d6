"""Error-compensated 1-bit all-reduce (Tang et al. 2021, "1-bit Adam", Alg. 1).

Each worker sends one bit per element plus one float scale per tensor, in two
phases (a compressed reduce-scatter, then a compressed all-gather):

1. worker: x = v + e_w, scale s = ‖x‖₂/√n, signs sign(x) with sign(0) = +1,
   e_w ← x − s·sign(x). Packed signs go out with one all-to-all (worker j
   receives everybody's chunk j) and the scales with one all-gather.
2. server (every worker, for its own chunk): y = Σ_i s_i·sign_i / P + e_s,
   recompressed the same way (e_s ← y − s_s·sign(y)); packed signs and scales
   are all-gathered, and every worker decodes the same result.

Vectors are padded to a multiple of P·lcm(P, 8) so every chunk is a whole
number of bytes. Several tensors are compressed in one call (each with its own
scale) but travel in the same four collectives, so the number of
communication rounds does not grow with the number of tensors.

The functions here run per worker, inside ``jax.shard_map`` over the
data-parallel mesh axes or inside ``jax.vmap(..., axis_name=...)``, which
simulates P workers in one process with the same code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import onebit


class ErrorFeedback(NamedTuple):
  """One worker's compression errors for one compressed vector.

  Shapes are per worker; stacked over workers they gain a leading axis.
  """

  worker: jax.Array  # float32 [n_pad]: e_w, what the worker's 1-bit message left out
  server: jax.Array  # float32 [n_pad / P]: e_s, the same for the chunk it serves


def padded_size(n: int, world: int) -> int:
  """Smallest multiple of ``world · lcm(world, 8)`` that is at least ``n``."""
  unit = world * math.lcm(world, 8)
  return max(1, -(-n // unit)) * unit


def zero_error_feedback(n: int, world: int) -> ErrorFeedback:
  """Zero errors for one worker's vector of ``n`` elements."""
  size = padded_size(n, world)
  return ErrorFeedback(jnp.zeros((size,), jnp.float32), jnp.zeros((size // world,), jnp.float32))


def packed_bytes_per_worker(n: int, world: int) -> dict[str, int]:
  """Bytes one worker sends per compressed vector of ``n`` float32 elements.

  The cost model of the two phases (4-byte scales): phase 1 sends P−1 of its
  P chunks of packed signs and its scale to P−1 peers; phase 2 sends its packed
  server chunk and server scale to P−1 peers.
  """
  size = padded_size(n, world)
  chunk_bytes = size // world // onebit.BITS_PER_WORD
  return {
      "phase1_signs": (world - 1) * chunk_bytes,
      "phase1_scales": (world - 1) * 4,
      "phase2_signs": (world - 1) * chunk_bytes,
      "phase2_scales": (world - 1) * 4,
  }


def compress_segments(x: jax.Array, error: jax.Array, segments: np.ndarray,
                      num_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Compresses ``x + error`` with one scale per segment of columns.

  Args:
    x, error: float32 [R, C]; column c belongs to segment ``segments[c]`` and
      every segment spans a multiple of 8 columns, so no byte mixes segments.
    segments: int [C], static.
    num_segments: T.

  Returns:
    (packed signs uint8 [R, C/8], scales float32 [T], new error float32 [R, C]).
    Each segment's rows, flattened, are compressed exactly as
    ``onebit.compress_reference`` does (bit-for-bit equal packed output).
  """
  if onebit.use_pallas():  # one fused kernel per segment
    packed, scales, errors = [], [], []
    bounds = np.concatenate([[0], np.cumsum(np.bincount(segments, minlength=num_segments))])
    rows = x.shape[0]
    for lo, hi in itertools.pairwise(bounds):
      bits, scale, err = onebit.compress(x[:, lo:hi].reshape(-1), error[:, lo:hi].reshape(-1))
      packed.append(bits.reshape(rows, -1))
      scales.append(scale)
      errors.append(err.reshape(rows, -1))
    return (jnp.concatenate(packed, axis=1), jnp.stack(scales),
            jnp.concatenate(errors, axis=1))
  y = x + error
  counts = np.bincount(segments, minlength=num_segments) * x.shape[0]
  sums = jax.ops.segment_sum(jnp.sum(y * y, axis=0), segments, num_segments)
  scales = jnp.sqrt(sums / counts)
  signs = jnp.where(y >= 0, 1.0, -1.0)
  return onebit.pack_signs(y), scales, y - scales[segments] * signs


def compressed_allreduce(
    vectors: Sequence[jax.Array], errors: Sequence[ErrorFeedback], axis_name, world: int
) -> tuple[list[jax.Array], list[ErrorFeedback]]:
  """Averages each worker's ``vectors`` over ``axis_name`` with 1-bit messages.

  Call per worker inside ``shard_map`` or a named ``vmap``.

  Args:
    vectors: this worker's flat float32 vectors, [n_t] each.
    errors: their error feedback, ``zero_error_feedback(n_t, world)`` at first.
    axis_name: the mapped axis (or tuple of mesh axes) the workers span.
    world: P, the size of that axis.

  Returns:
    (the compressed averages, [n_t] each and identical on every worker;
    the new error feedback).
  """
  # Layout [P, C]: row j holds, for every vector, the chunk that worker j serves.
  chunks = [e.server.shape[0] for e in errors]
  segments = np.repeat(np.arange(len(chunks)), chunks)
  num = len(chunks)
  x = jnp.concatenate([jnp.pad(v.astype(jnp.float32), (0, world * c - v.shape[0]))
                       .reshape(world, c) for v, c in zip(vectors, chunks)], axis=1)
  worker_error = jnp.concatenate([e.worker.reshape(world, -1) for e in errors], axis=1)
  packed, scales, worker_error = compress_segments(x, worker_error, segments, num)

  # Phase 1: everybody's chunk j, and everybody's scales, reach worker j.
  received = jax.lax.all_to_all(packed, axis_name, 0, 0)  # [P, C/8]
  received_scales = jax.lax.all_gather(scales, axis_name)  # [P, T]
  signs = onebit.unpack_signs(received)  # [P, C]
  mean = jnp.mean(signs * received_scales[:, segments], axis=0)
  server_error = jnp.concatenate([e.server for e in errors])
  server_packed, server_scales, server_error = compress_segments(
      mean[None], server_error[None], segments, num)

  # Phase 2: every worker gathers every served chunk.
  gathered = jax.lax.all_gather(server_packed[0], axis_name)  # [P, C/8]
  gathered_scales = jax.lax.all_gather(server_scales, axis_name)  # [P, T]
  result = onebit.unpack_signs(gathered) * gathered_scales[:, segments]  # [P, C]

  split = np.cumsum(chunks)[:-1]
  averages = [r.reshape(-1)[:v.shape[0]]
              for r, v in zip(jnp.split(result, split, axis=1), vectors)]
  new_errors = [ErrorFeedback(w.reshape(-1), s) for w, s in
                zip(jnp.split(worker_error, split, axis=1),
                    jnp.split(server_error[0], split))]
  return averages, new_errors
