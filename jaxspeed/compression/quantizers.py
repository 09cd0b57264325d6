"""Fake quantizers with straight-through gradients (DeepSpeed compression, ZeroQuant, XTC).

Every quantizer maps a float tensor to the float value of its quantized form
(``q · scale``), splitting the flattened tensor into ``groups`` equal
contiguous chunks that each get their own range, as DeepSpeed's compression
library does. The backward pass is the straight-through estimator (Bengio et
al. 2013): gradient 1 inside the clip range, 0 outside.

Formulas (reference: DeepSpeed ``compression/utils.py``):
  symmetric:  s = 2·max|x| / 2^b,  q = clamp(round(x/s), -2^(b-1), 2^(b-1)-1)
  asymmetric: s = (max - min) / 2^b, z = round(min/s)·s,
              q = clamp(round((x - z)/s), 0, 2^b - 1), value q·s + z
  ternary:    Δ = 0.7·mean|x|, α = mean(|x| where |x| > Δ), value α·sign(x)·[|x| > Δ]
              (Li et al. 2016, "Ternary Weight Networks")
  binary:     sign(x)·mean|x| (Rastegari et al. 2016, XNOR-Net)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUANTIZATION_TYPES = ("symmetric", "asymmetric")
# Ranges below this are treated as this, so an all-zero group quantizes to 0.
TINY = 1e-12  # the smallest scale a quantizer divides by


def ste(x: jax.Array, q: jax.Array, lo: jax.Array | None = None,
        hi: jax.Array | None = None) -> jax.Array:
  """Value ``q``, gradient of x: identity inside [lo, hi] (clipped STE), 0 outside."""
  if lo is not None:
    inside = (x >= lo) & (x <= hi)
    x = jnp.where(inside, x, jax.lax.stop_gradient(x))
  return x + jax.lax.stop_gradient(q - x)


def _grouped(x: jax.Array, groups: int) -> jax.Array:
  if x.size % groups:
    raise ValueError(f"groups={groups} does not divide the {x.size} elements of {x.shape}")
  return x.reshape(groups, -1)


def symmetric_range(bits: int) -> tuple[int, int]:
  """Integer range [-2^(b-1), 2^(b-1) - 1] of a signed b-bit code."""
  return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def symmetric_scale(absmax: jax.Array, bits: int) -> jax.Array:
  """s = 2·max|x| / 2^b (DeepSpeed's ``SymQuantizer``)."""
  return jnp.maximum(2 * absmax / 2**bits, TINY)


def symmetric_codes(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
  """clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) as float (integer values)."""
  lo, hi = symmetric_range(bits)
  return jnp.clip(jnp.round(x / scale), lo, hi)


def quantize_symmetric(x: jax.Array, bits: int, groups: int = 1) -> jax.Array:
  """Symmetric b-bit fake quantization per group; same shape as ``x``."""
  g = _grouped(x, groups)
  scale = symmetric_scale(jnp.max(jnp.abs(g), axis=1, keepdims=True), bits)
  q = symmetric_codes(g, scale, bits) * scale
  return ste(x, q.reshape(x.shape))


def quantize_asymmetric(x: jax.Array, bits: int, groups: int = 1) -> jax.Array:
  """Asymmetric b-bit fake quantization (scale and zero point) per group."""
  g = _grouped(x, groups)
  lo, hi = jnp.min(g, axis=1, keepdims=True), jnp.max(g, axis=1, keepdims=True)
  return ste(x, _asymmetric(g, lo, hi, bits).reshape(x.shape))


def asymmetric_codes(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """clamp(round((x - z) / s), 0, 2^b - 1) as float (integer values)."""
  return jnp.clip(jnp.round((x - zero) / scale), 0, 2**bits - 1)


def _asymmetric(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int) -> jax.Array:
  scale = jnp.maximum((hi - lo) / 2**bits, TINY)
  zero = jnp.round(lo / scale) * scale
  return asymmetric_codes(x, scale, zero, bits) * scale + zero


def quantize_ternary(x: jax.Array, groups: int = 1) -> jax.Array:
  """Ternary {-α, 0, α} per group with threshold Δ = 0.7·mean|x|."""
  g = _grouped(x, groups)
  a = jnp.abs(g)
  keep = a > 0.7 * jnp.mean(a, axis=1, keepdims=True)
  alpha = jnp.sum(jnp.where(keep, a, 0), axis=1, keepdims=True) / jnp.maximum(
      jnp.sum(keep, axis=1, keepdims=True), 1)
  q = jnp.where(keep, alpha * jnp.sign(g), 0.0)
  return ste(x, q.reshape(x.shape))


def quantize_binary(x: jax.Array, groups: int = 1) -> jax.Array:
  """Binary sign(x)·mean|x| per group (sign(0) = +1)."""
  g = _grouped(x, groups)
  q = jnp.where(g >= 0, 1.0, -1.0) * jnp.mean(jnp.abs(g), axis=1, keepdims=True)
  return ste(x, q.reshape(x.shape))


def quantize(x: jax.Array, bits: int, groups: int = 1,
             quantization_type: str = "symmetric") -> jax.Array:
  """Fake quantization at ``bits``: 1 is binary, 2 ternary, 3-8 symmetric/asymmetric.

  This is DeepSpeed's choice of quantizer by target bits.
  """
  if bits == 1:
    return quantize_binary(x, groups)
  if bits == 2:
    return quantize_ternary(x, groups)
  if not 3 <= bits <= 8:
    raise ValueError(f"bits must be in 1..8, got {bits}")
  if quantization_type == "symmetric":
    return quantize_symmetric(x, bits, groups)
  if quantization_type == "asymmetric":
    return quantize_asymmetric(x, bits, groups)
  raise ValueError(f"quantization_type={quantization_type!r}; allowed: {QUANTIZATION_TYPES}")


def quantize_weight(w: jax.Array, bits: int, groups: int = 1,
                    quantization_type: str = "symmetric") -> jax.Array:
  """Fake-quantizes a [d_in, d_out] weight in groups of output channels.

  DeepSpeed groups the flattened PyTorch [d_out, d_in] weight, i.e. rows =
  output channels; jaxspeed stores [d_in, d_out], so the groups are taken on
  the transpose.
  """
  return quantize(w.T, bits, groups, quantization_type).T


def quantize_tokenwise(x: jax.Array, bits: int = 8,
                       quantization_type: str = "symmetric") -> jax.Array:
  """Dynamic activation quantization, one range per token (ZeroQuant).

  Args:
    x: [..., d]; each [d] vector gets its own range, computed on the fly.
  """
  return quantize(x, bits, x.size // x.shape[-1], quantization_type)


def ema_range(state: tuple[jax.Array, jax.Array] | None, x: jax.Array,
              momentum: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Static activation range: EMA of min and max (DeepSpeed's ``QuantAct``).

  Args:
    state: (min, max) float32 [] so far, or None for the first batch.
    x: a batch of activations.
    momentum: weight of the old range.

  Returns:
    The new (min, max).
  """
  lo, hi = jnp.min(x).astype(jnp.float32), jnp.max(x).astype(jnp.float32)
  if state is None:
    return lo, hi
  return (momentum * state[0] + (1 - momentum) * lo, momentum * state[1] + (1 - momentum) * hi)


def quantize_static(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int = 8) -> jax.Array:
  """Asymmetric b-bit quantization in a fixed calibrated range [lo, hi].

  Values outside the range clip, and get zero gradient (clipped STE).
  """
  q = _asymmetric(jnp.clip(x, lo, hi), lo, hi, bits)
  return ste(x, q, lo, hi)
