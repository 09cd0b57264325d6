"""1-bit compression with error feedback, the communication step of 1-bit Adam.

Tang et al. 2021, "1-bit Adam: Communication Efficient Large-Scale Training with
Adam's Convergence Speed" (arXiv:2102.02888), Algorithm 1: each worker sends
sign(x + e) and one scale, keeps the compression error e for the next step, and
the receiver averages the P workers' decompressed vectors.

Wire format: byte i of the packed vector holds elements 8i..8i+7; bit k (value
``1 << k``) is 1 iff element 8i+k is >= 0. sign(0) is +1, so an all-zero vector
round-trips with scale 0 and error 0. NaN compares false and packs as -1.

The Pallas kernels are tested in interpret mode on CPU only; the GPU path is
untested here (no GPU). The Pallas Triton lowering also needs loads and stores
of power-of-2 sizes, so on GPU ``n // 8`` and the worker count P should be powers of 2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BITS_PER_WORD = 8

# Rows of the [m, 8] output per decompress grid step; m not divisible by it
# falls back to a single block.
_DECOMPRESS_BLOCK_ROWS = 1024


def use_pallas() -> bool:
  """Whether the library should call the kernels (GPU) rather than the references."""
  return jax.default_backend() == "gpu"


def _check_packable(n: int) -> None:
  if n % BITS_PER_WORD:
    raise ValueError(f"last dimension must be a multiple of {BITS_PER_WORD}, got {n}")


def _bit_values() -> jax.Array:
  """[8] int32: 1 << k for bit k."""
  return jnp.left_shift(1, jnp.arange(BITS_PER_WORD, dtype=jnp.int32))


@jax.jit
def pack_signs(x: jax.Array) -> jax.Array:
  """Packs the signs of ``x`` (sign(0) = +1) into bytes, 8 elements per byte.

  Args:
    x: float [..., n] with n % 8 == 0.

  Returns:
    uint8 [..., n // 8].
  """
  n = x.shape[-1]
  _check_packable(n)
  words = x.reshape(*x.shape[:-1], n // BITS_PER_WORD, BITS_PER_WORD)
  # Distinct powers of two below 256 sum to at most 255, so uint8 cannot overflow.
  return jnp.sum(jnp.where(words >= 0, _bit_values(), 0), axis=-1).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("dtype",))
def unpack_signs(packed: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Inverse of ``pack_signs``.

  Args:
    packed: uint8 [..., m].
    dtype: output dtype.

  Returns:
    [..., 8m] of +1 / -1.
  """
  bits = (packed.astype(jnp.int32)[..., None] & _bit_values()) != 0
  signs = jnp.where(bits, 1, -1).astype(dtype)
  return signs.reshape(*packed.shape[:-1], packed.shape[-1] * BITS_PER_WORD)


def _check_compress_args(x: jax.Array, error: jax.Array) -> None:
  if x.ndim != 1 or x.shape != error.shape:
    raise ValueError(f"x and error must be equal 1-D shapes, got {x.shape} and {error.shape}")
  _check_packable(x.shape[0])


@jax.jit
def compress_reference(x: jax.Array, error: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """1-bit compression with error feedback (Tang et al. 2021, Alg. 1), pure JAX.

  y = x + error; scale = ||y||_2 / sqrt(n), the RMS, so that scale * sign(y)
  has the same norm as y; new_error = y - scale * sign(y).

  Args:
    x: float32 [n], n % 8 == 0.
    error: float32 [n], the error carried from the previous step.

  Returns:
    (packed uint8 [n // 8], scale float32 [], new_error float32 [n]).
  """
  _check_compress_args(x, error)
  y = x.astype(jnp.float32) + error.astype(jnp.float32)
  scale = jnp.sqrt(jnp.sum(y * y) / y.shape[0])
  new_error = y - scale * jnp.where(y >= 0, 1.0, -1.0)
  return pack_signs(y), scale, new_error


def _compress_kernel(x_ref, e_ref, packed_ref, scale_ref, error_ref, *, n: int):
  """Refs: x, e, new error [m, 8] f32; packed [m] u8; scale [1, 1] f32."""
  y = x_ref[...] + e_ref[...]
  # keepdims throughout so the kernel needs no reshapes and no rank-0 values.
  sum_sq = jnp.sum(jnp.sum(y * y, axis=1, keepdims=True), axis=0, keepdims=True)
  scale = jnp.sqrt(sum_sq / n)
  positive = y >= 0
  bit = jnp.left_shift(1, jax.lax.broadcasted_iota(jnp.int32, y.shape, 1))
  packed_ref[...] = jnp.sum(jnp.where(positive, bit, 0), axis=1).astype(jnp.uint8)
  scale_ref[...] = scale
  error_ref[...] = y - scale * jnp.where(positive, 1.0, -1.0)


@functools.partial(jax.jit, static_argnames=("interpret",))
def compress(x: jax.Array, error: jax.Array, *, interpret: bool = False
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pallas version of ``compress_reference``: one pass over x and error.

  The whole vector is one block because the scale is a global reduction that
  every element's error depends on; splitting it would need a second pass.

  Args:
    x: float32 [n], n % 8 == 0.
    error: float32 [n].
    interpret: run the kernel in the Pallas interpreter (works on CPU).

  Returns:
    (packed uint8 [n // 8], scale float32 [], new_error float32 [n]).
  """
  _check_compress_args(x, error)
  n = x.shape[0]
  m = n // BITS_PER_WORD
  packed, scale, new_error = pl.pallas_call(
      functools.partial(_compress_kernel, n=n),
      out_shape=(
          jax.ShapeDtypeStruct((m,), jnp.uint8),
          jax.ShapeDtypeStruct((1, 1), jnp.float32),
          jax.ShapeDtypeStruct((m, BITS_PER_WORD), jnp.float32),
      ),
      interpret=interpret,
  )(x.astype(jnp.float32).reshape(m, BITS_PER_WORD),
    error.astype(jnp.float32).reshape(m, BITS_PER_WORD))
  return packed, scale.reshape(()), new_error.reshape(n)


def _check_decompress_args(packed: jax.Array, scales: jax.Array) -> None:
  if packed.ndim != 2 or scales.shape != packed.shape[:1]:
    raise ValueError(f"need packed [P, m] and scales [P], got {packed.shape} and {scales.shape}")


@jax.jit
def decompress_average_reference(packed: jax.Array, scales: jax.Array) -> jax.Array:
  """Average of P workers' 1-bit vectors, mean_j scales[j] * signs_j, pure JAX.

  Args:
    packed: uint8 [P, m].
    scales: float32 [P].

  Returns:
    float32 [8m].
  """
  _check_decompress_args(packed, scales)
  return jnp.mean(scales.astype(jnp.float32)[:, None] * unpack_signs(packed), axis=0)


def _decompress_average_kernel(packed_ref, scales_ref, out_ref, *, num_workers: int):
  """Refs: packed [P, bm, 1] u8; scales [P, 1, 1] f32; out [bm, 8] f32."""
  bit = jnp.left_shift(1, jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 1))
  total = jnp.zeros(out_ref.shape, jnp.float32)
  # P is a handful of workers, so a static unroll is cheaper than a loop carry.
  for j in range(num_workers):
    byte = packed_ref[j].astype(jnp.int32)
    total += scales_ref[j] * jnp.where((byte & bit) != 0, 1.0, -1.0)
  out_ref[...] = total / num_workers


@functools.partial(jax.jit, static_argnames=("interpret",))
def decompress_average(packed: jax.Array, scales: jax.Array, *, interpret: bool = False
                       ) -> jax.Array:
  """Pallas version of ``decompress_average_reference``, gridded over output rows.

  Args:
    packed: uint8 [P, m].
    scales: float32 [P].
    interpret: run the kernel in the Pallas interpreter (works on CPU).

  Returns:
    float32 [8m].
  """
  _check_decompress_args(packed, scales)
  p, m = packed.shape
  rows = _DECOMPRESS_BLOCK_ROWS if m % _DECOMPRESS_BLOCK_ROWS == 0 else m
  out = pl.pallas_call(
      functools.partial(_decompress_average_kernel, num_workers=p),
      out_shape=jax.ShapeDtypeStruct((m, BITS_PER_WORD), jnp.float32),
      grid=(m // rows,),
      in_specs=[
          pl.BlockSpec((p, rows, 1), lambda i: (0, i, 0)),
          pl.BlockSpec((p, 1, 1), lambda i: (0, 0, 0)),
      ],
      out_specs=pl.BlockSpec((rows, BITS_PER_WORD), lambda i: (i, 0)),
      interpret=interpret,
  )(packed.reshape(p, m, 1), scales.astype(jnp.float32).reshape(p, 1, 1))
  return out.reshape(m * BITS_PER_WORD)

