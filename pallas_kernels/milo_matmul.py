"""W3A16 matmul with a fused low-rank compensator (MiLo, Huang et al. 2025, arXiv:2504.02658).

MiLo stores each expert weight W [K, N] as group-wise asymmetric low-bit codes
plus a low-rank term: W ≈ deq(Q) + U·V, with deq(Q)[k, n] = Q[k, n]·s[g, n] +
m[g, n] for the K-group g = k // group_size. The matmul it needs is

  y = x · deq(Q) + (x · U) · V

with x in 16 (or 32) bits, the codes unpacked and dequantized on the fly.

Code layout: bit planes of 32 rows. For b-bit codes Q [K, N] (K a multiple of
32), ``packed`` is uint32 [b, K/32, N]; bit i of ``packed[j, t, n]`` is bit j of
``Q[32·t + i, n]``. Three bits per weight exactly (10 codes per int32 would
waste 2 of 32 bits, 6%; 8 codes in 3 bytes straddle byte boundaries, so each
code needs its own shifts), and every column unpacks with the same shifts, which
vectorize along N. The same layout holds 2- and 4-bit codes (b planes).

Tested in interpret mode on CPU against ``milo_matmul_reference``; the GPU path
is untested here (no GPU). The library calls the kernel only when
``use_pallas()`` (GPU) and the reference elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.quant_matmul import block_size, use_pallas

__all__ = ["milo_matmul", "milo_matmul_reference", "pack_bitplanes", "unpack_bitplanes",
           "use_pallas"]

ROWS_PER_WORD = 32
_BLOCK_M = 128
_BLOCK_N = 128


def pack_bitplanes(codes: jax.Array, bits: int) -> jax.Array:
  """Codes in [0, 2^bits), [K, N] with K % 32 == 0 -> uint32 [bits, K/32, N]."""
  k, n = codes.shape
  if k % ROWS_PER_WORD:
    raise ValueError(f"bit-plane packing needs K divisible by 32, got {codes.shape}")
  rows = codes.astype(jnp.uint32).reshape(k // ROWS_PER_WORD, ROWS_PER_WORD, n)
  shift = jnp.arange(ROWS_PER_WORD, dtype=jnp.uint32)[None, :, None]
  planes = [jnp.sum(((rows >> j) & 1) << shift, axis=1, dtype=jnp.uint32) for j in range(bits)]
  return jnp.stack(planes)


def _unpack(planes: jax.Array) -> jax.Array:
  """uint32 [bits, T, N] -> int32 codes [32·T, N]."""
  bits, t, n = planes.shape
  shift = jnp.arange(ROWS_PER_WORD, dtype=jnp.uint32)[None, :, None]
  codes = jnp.zeros((t, ROWS_PER_WORD, n), jnp.uint32)
  for j in range(bits):
    codes = codes | (((planes[j][:, None, :] >> shift) & 1) << j)
  return codes.reshape(t * ROWS_PER_WORD, n).astype(jnp.int32)


def unpack_bitplanes(packed: jax.Array) -> jax.Array:
  """uint32 [bits, K/32, N] -> int32 codes [K, N] in [0, 2^bits)."""
  return _unpack(packed)


def dequantize(packed: jax.Array, scales: jax.Array, mins: jax.Array) -> jax.Array:
  """float32 [K, N] = codes · scales + mins, one (scale, min) per K-group and column.

  Args:
    packed: uint32 [bits, K/32, N]; scales, mins: float [G, N], G dividing K.
  """
  codes = unpack_bitplanes(packed).astype(jnp.float32)
  k, n = codes.shape
  g = scales.shape[0]
  w = codes.reshape(g, k // g, n) * scales[:, None, :] + mins[:, None, :]
  return w.reshape(k, n)


def _check(x, packed, scales, mins, u, v) -> None:
  k = packed.shape[1] * ROWS_PER_WORD
  n = packed.shape[2]
  if x.shape[-1] != k or scales.shape != mins.shape or scales.shape[1] != n:
    raise ValueError(f"x {x.shape}, codes for [{k}, {n}], scales {scales.shape}, mins "
                     f"{mins.shape} do not match")
  if k % scales.shape[0] or (k // scales.shape[0]) % ROWS_PER_WORD:
    raise ValueError(f"{scales.shape[0]} groups must split K={k} into multiples of 32 rows")
  if (u is None) != (v is None) or (u is not None and (u.shape[0] != k or v.shape[1] != n
                                                       or u.shape[1] != v.shape[0])):
    raise ValueError(f"compensator U {None if u is None else u.shape}, V "
                     f"{None if v is None else v.shape} do not fit [{k}, {n}]")


@jax.jit
def milo_matmul_reference(x: jax.Array, packed: jax.Array, scales: jax.Array, mins: jax.Array,
                          u: jax.Array | None = None, v: jax.Array | None = None) -> jax.Array:
  """y = x · deq(Q) + (x · U) · V in XLA (dequantize the whole weight, then two dots).

  Args:
    x: [M, K] float (bfloat16/float16/float32).
    packed: uint32 [bits, K/32, N]; scales, mins: float32 [G, N].
    u: [K, r], v: [r, N] the compensator, or None.

  Returns:
    float32 [M, N].
  """
  _check(x, packed, scales, mins, u, v)
  x = x.astype(jnp.float32)
  y = x @ dequantize(packed, scales, mins)
  if u is not None:
    y = y + (x @ u.astype(jnp.float32)) @ v.astype(jnp.float32)
  return y


def _kernel(*refs, groups: int, words_per_group: int, low_rank: bool):
  """Refs: x [bm, K]; packed [bits, K/32, bn] u32; scales, mins [G, bn]; (u [K, r],
  v [r, bn]); out [bm, bn] f32."""
  if low_rank:
    x_ref, w_ref, s_ref, m_ref, u_ref, v_ref, o_ref = refs
  else:
    x_ref, w_ref, s_ref, m_ref, o_ref = refs
  group_size = words_per_group * ROWS_PER_WORD

  def body(g, acc):
    rows = pl.ds(pl.multiple_of(g * group_size, group_size), group_size)
    words = pl.ds(pl.multiple_of(g * words_per_group, words_per_group), words_per_group)
    codes = _unpack(w_ref[:, words, :]).astype(jnp.float32)  # [group_size, bn]
    w = codes * s_ref[pl.ds(g, 1), :] + m_ref[pl.ds(g, 1), :]
    return acc + jnp.dot(x_ref[:, rows].astype(jnp.float32), w,
                         preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, groups, body, jnp.zeros(o_ref.shape, jnp.float32))
  if low_rank:  # x·U is [bm, r]: recomputed per N block, r is small
    xu = jnp.dot(x_ref[...].astype(jnp.float32), u_ref[...].astype(jnp.float32),
                 preferred_element_type=jnp.float32)
    acc = acc + jnp.dot(xu, v_ref[...].astype(jnp.float32), preferred_element_type=jnp.float32)
  o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("interpret",))
def milo_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, mins: jax.Array,
                u: jax.Array | None = None, v: jax.Array | None = None, *,
                interpret: bool = False) -> jax.Array:
  """Pallas version of ``milo_matmul_reference``; the codes stay packed in memory.

  Gridded over [bm, bn] output blocks; each program unpacks one K-group of
  codes at a time, dequantizes it and accumulates its dot in float32, then
  adds the low-rank term (x·U)·V. A rank-0 compensator (r = 0) is passed as None.
  """
  _check(x, packed, scales, mins, u, v)
  m, k = x.shape
  bits, _, n = packed.shape
  g = scales.shape[0]
  bm, bn = block_size(m, _BLOCK_M), block_size(n, _BLOCK_N)
  low_rank = u is not None and u.shape[1] > 0
  in_specs = [pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
              pl.BlockSpec((bits, k // ROWS_PER_WORD, bn), lambda i, j: (0, 0, j)),
              pl.BlockSpec((g, bn), lambda i, j: (0, j)),
              pl.BlockSpec((g, bn), lambda i, j: (0, j))]
  args = [x, packed, scales.astype(jnp.float32), mins.astype(jnp.float32)]
  if low_rank:
    r = u.shape[1]
    in_specs += [pl.BlockSpec((k, r), lambda i, j: (0, 0)),
                 pl.BlockSpec((r, bn), lambda i, j: (0, j))]
    args += [u, v]
  return pl.pallas_call(
      functools.partial(_kernel, groups=g, words_per_group=k // g // ROWS_PER_WORD,
                        low_rank=low_rank),
      grid=(m // bm, n // bn), in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32), interpret=interpret,
  )(*args)
