"""2-bit asymmetric quantization and 4-per-byte packing for the MiniKV cache.

MiniKV (Sharma et al. 2024), after KIVI (Liu et al. 2024): keys are quantized
per channel (their outliers live in fixed channels), values per token. Each
group shares a scale and a zero point: x ≈ zero + scale · q, q ∈ {0, 1, 2, 3}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BITS = 2
LEVELS = 2**BITS - 1
PER_BYTE = 8 // BITS


def pack(q: jax.Array) -> jax.Array:
  """uint8 codes in [0, 3], [..., D] with D % 4 == 0 -> uint8 [..., D/4], 4 codes per byte."""
  q = q.astype(jnp.uint8).reshape(*q.shape[:-1], q.shape[-1] // PER_BYTE, PER_BYTE)
  shifts = jnp.arange(PER_BYTE, dtype=jnp.uint8) * BITS
  return jnp.bitwise_or.reduce(q << shifts, axis=-1)


def unpack(packed: jax.Array) -> jax.Array:
  """Inverse of ``pack``: uint8 [..., D/4] -> uint8 codes [..., D]."""
  shifts = jnp.arange(PER_BYTE, dtype=jnp.uint8) * BITS
  q = (packed[..., None] >> shifts) & LEVELS
  return q.reshape(*packed.shape[:-1], packed.shape[-1] * PER_BYTE)


def quant_params(x: jax.Array, axis: int, valid: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) of the min/max range along ``axis`` (float32, axis kept as size 1).

  ``valid`` (broadcastable to x) excludes entries, e.g. pad tokens, from the range.
  """
  x = x.astype(jnp.float32)
  lo = jnp.min(x if valid is None else jnp.where(valid, x, jnp.inf), axis=axis, keepdims=True)
  hi = jnp.max(x if valid is None else jnp.where(valid, x, -jnp.inf), axis=axis, keepdims=True)
  lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)  # all-invalid groups: lo = inf, hi = -inf
  lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
  return jnp.maximum(hi - lo, 1e-8) / LEVELS, lo


def quantize(x: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
  """Packed 2-bit codes of x [..., D] (values outside the range are clipped)."""
  q = jnp.clip(jnp.round((x.astype(jnp.float32) - zero) / scale), 0, LEVELS)
  return pack(q)


def dequantize(packed: jax.Array, scale: jax.Array, zero: jax.Array, dtype) -> jax.Array:
  return (zero + scale * unpack(packed).astype(jnp.float32)).astype(dtype)
