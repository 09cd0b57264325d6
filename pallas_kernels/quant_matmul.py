"""Quantized matmuls: W8A8 and int4-weight / int8-activation with group-wise scales.

ZeroQuant (Yao et al. 2022, arXiv:2206.01861) runs linear layers with int8
token-wise activations and int8 or int4 group-wise weights; DeepSpeed never
released those kernels (DeepSpeed issue #2239). Here, for activations
x ≈ diag(sx) · X (X int8 [M, K], sx [M]) and weights w ≈ W · sw per K-group
(W int [K, N], sw [G, N], group size K / G):

  y[m, n] = sx[m] · Σ_g sw[g, n] · Σ_{k in g} X[m, k] · W[k, n]

with each inner sum an int8 x int8 -> int32 dot. int4 weights arrive packed
two per byte along K (row 2i in the low nibble of byte i, row 2i + 1 in the
high one); the kernel multiplies the even columns of X with the low nibbles
and the odd ones with the high nibbles, so it never re-interleaves rows.

Tested in interpret mode on CPU against the references; the GPU path is
untested here (no GPU). The library calls the kernels only when
``use_pallas()`` (GPU) and the references elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_BLOCK_M = 128
_BLOCK_N = 128


def use_pallas() -> bool:
  """Whether the library should call the kernels (GPU) rather than the references."""
  return jax.default_backend() == "gpu"


def block_size(dim: int, preferred: int) -> int:
  """The largest power-of-2 block <= preferred dividing ``dim``, or ``dim`` itself."""
  b = preferred
  while b >= 16:
    if dim % b == 0:
      return b
    b //= 2
  return dim


def _check(x_codes, x_scales, k: int, w_scales) -> None:
  m = x_codes.shape[0]
  if x_codes.shape[1] != k or x_scales.shape != (m,):
    raise ValueError(f"activations {x_codes.shape} / scales {x_scales.shape} do not match "
                     f"K={k}")
  if k % w_scales.shape[0]:
    raise ValueError(f"{w_scales.shape[0]} scale groups do not divide K={k}")


def _int_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 2,)), ((), ())),
                             preferred_element_type=jnp.int32)


def unpack_int4(packed: jax.Array) -> jax.Array:
  """uint8 [K/2, N] -> int8 [K, N] (two's-complement nibbles, low nibble first)."""
  low = jnp.right_shift(jnp.left_shift(packed, 4).astype(jnp.int8), 4)
  high = jnp.right_shift(packed.astype(jnp.int8), 4)
  return jnp.stack([low, high], axis=1).reshape(2 * packed.shape[0], *packed.shape[1:])


@jax.jit
def w8a8_matmul_reference(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                          w_scales: jax.Array) -> jax.Array:
  """The module formula in pure JAX.

  Args:
    x_codes: int8 [M, K]; x_scales: float32 [M].
    w_codes: int8 [K, N]; w_scales: float32 [G, N].

  Returns:
    float32 [M, N].
  """
  m, k = x_codes.shape
  g, n = w_scales.shape
  _check(x_codes, x_scales, w_codes.shape[0], w_scales)
  acc = jax.lax.dot_general(x_codes.reshape(m, g, k // g), w_codes.reshape(g, k // g, n),
                            (((2,), (1,)), ((1,), (0,))),
                            preferred_element_type=jnp.int32)  # [G, M, N]
  return jnp.sum(acc.astype(jnp.float32) * w_scales[:, None, :], axis=0) * x_scales[:, None]


@jax.jit
def w4a8_matmul_reference(x_codes: jax.Array, x_scales: jax.Array, w_packed: jax.Array,
                          w_scales: jax.Array) -> jax.Array:
  """``w8a8_matmul_reference`` with packed int4 weights uint8 [K/2, N]."""
  return w8a8_matmul_reference(x_codes, x_scales, unpack_int4(w_packed), w_scales)


def _w8a8_kernel(x_ref, sx_ref, w_ref, sw_ref, o_ref, *, groups: int, group_size: int):
  """Refs: x [bm, K] i8; sx [bm, 1] f32; w [K, bn] i8; sw [G, bn] f32; o [bm, bn] f32."""
  def body(g, acc):
    rows = pl.ds(pl.multiple_of(g * group_size, group_size), group_size)
    part = _int_dot(x_ref[:, rows], w_ref[rows, :]).astype(jnp.float32)
    return acc + part * sw_ref[pl.ds(g, 1), :]

  acc = jax.lax.fori_loop(0, groups, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc * sx_ref[...]


def _w4a8_kernel(xe_ref, xo_ref, sx_ref, w_ref, sw_ref, o_ref, *, groups: int,
                 half_group: int):
  """Refs: x even / odd columns [bm, K/2] i8; sx [bm, 1]; w packed [K/2, bn] u8; sw [G, bn]."""
  def body(g, acc):
    rows = pl.ds(pl.multiple_of(g * half_group, half_group), half_group)
    packed = w_ref[rows, :]
    low = jnp.right_shift(jnp.left_shift(packed, 4).astype(jnp.int8), 4)
    high = jnp.right_shift(packed.astype(jnp.int8), 4)
    part = _int_dot(xe_ref[:, rows], low) + _int_dot(xo_ref[:, rows], high)
    return acc + part.astype(jnp.float32) * sw_ref[pl.ds(g, 1), :]

  acc = jax.lax.fori_loop(0, groups, body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc * sx_ref[...]


def _grid_specs(m: int, n: int, k_cols: int, k_rows: int, groups: int, num_x: int):
  bm, bn = block_size(m, _BLOCK_M), block_size(n, _BLOCK_N)
  x_spec = pl.BlockSpec((bm, k_cols), lambda i, j: (i, 0))
  in_specs = [x_spec] * num_x + [
      pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
      pl.BlockSpec((k_rows, bn), lambda i, j: (0, j)),
      pl.BlockSpec((groups, bn), lambda i, j: (0, j)),
  ]
  return dict(grid=(m // bm, n // bn), in_specs=in_specs,
              out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
              out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32))


@functools.partial(jax.jit, static_argnames=("interpret",))
def w8a8_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                w_scales: jax.Array, *, interpret: bool = False) -> jax.Array:
  """Pallas version of ``w8a8_matmul_reference``, gridded over output blocks.

  Each program holds a [bm, K] activation block and a [K, bn] weight block and
  accumulates one int32 dot per K-group into float32.
  """
  m, k = x_codes.shape
  g, n = w_scales.shape
  _check(x_codes, x_scales, w_codes.shape[0], w_scales)
  return pl.pallas_call(
      functools.partial(_w8a8_kernel, groups=g, group_size=k // g),
      interpret=interpret, **_grid_specs(m, n, k, k, g, num_x=1),
  )(x_codes, x_scales.astype(jnp.float32).reshape(m, 1), w_codes, w_scales.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("interpret",))
def w4a8_matmul(x_codes: jax.Array, x_scales: jax.Array, w_packed: jax.Array,
                w_scales: jax.Array, *, interpret: bool = False) -> jax.Array:
  """Pallas version of ``w4a8_matmul_reference``; the int4 weights stay packed in memory."""
  m, k = x_codes.shape
  g, n = w_scales.shape
  _check(x_codes, x_scales, 2 * w_packed.shape[0], w_scales)
  if (k // g) % 2:
    raise ValueError(f"int4 groups must hold an even number of rows, got {k // g}")
  pairs = x_codes.reshape(m, k // 2, 2)
  return pl.pallas_call(
      functools.partial(_w4a8_kernel, groups=g, half_group=k // g // 2),
      interpret=interpret, **_grid_specs(m, n, k // 2, k // 2, g, num_x=2),
  )(pairs[..., 0], pairs[..., 1], x_scales.astype(jnp.float32).reshape(m, 1), w_packed,
    w_scales.astype(jnp.float32))
