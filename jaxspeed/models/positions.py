"""Position encodings: rotary (RoFormer, Su et al. 2021) and ALiBi (Press et al. 2022).

Learned absolute positions are an ``nn.Embed`` in the model; both functions here
take explicit ``positions`` so that sequence-sharded or cached decoding can pass
each token's global index.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotates channel pairs (i, i + D/2) of ``x`` by angle pos·base^(-2i/D).

  Args:
    x: [B, S, H, D] queries or keys, D even.
    positions: [B, S] or [S] integer token positions.
  """
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., S, D/2]
  if angles.ndim == 2:
    angles = angles[None]
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
  """Per-head slopes 2^(-8i/n), with BLOOM's interleaving for non-powers of two."""
  def powers(n: int) -> list[float]:
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start ** (i + 1) for i in range(n)]

  closest = 2 ** math.floor(math.log2(num_heads))
  slopes = powers(closest)
  if closest < num_heads:
    slopes += powers(2 * closest)[0::2][: num_heads - closest]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
  """[1, H, S, T] (or [B, H, S, T]) bias −slope·(i − j) that penalizes attention by distance.

  Args:
    q_positions: [S] query positions, or [B, S] for one bias per batch row.
    k_positions: [T] key positions, or [B, T].
  """
  distance = (q_positions[..., :, None] - k_positions[..., None, :]).astype(jnp.float32)
  if distance.ndim == 2:
    distance = distance[None]
  return -alibi_slopes(num_heads)[None, :, None, None] * distance[:, None]
