"""A preallocated dense KV cache that a decoder's attention reads and extends.

Rows are right-padded: row b's prompt fills slots [0, len_b) and every token's
cache slot is its position, so learned, RoPE and ALiBi positions are simply
the slot index. A query at position p sees slots j <= p; the pad slots past a
row's prompt are masked until a decoded token overwrites them.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from jaxspeed.models.attention import dot_product_attention, repeat_kv_heads
from jaxspeed.models.layers import constrain

NEG_INF = jnp.finfo(jnp.float32).min


@flax.struct.dataclass
class KVCache:
  """One layer's keys and values, [B, T, Hkv, D] each (the kv heads of grouped-query attention).

  ``score`` [B, H, T] (float32, or None) accumulates the attention each key
  received; KV-compression policies rank keys by it (H2O's heavy hitters).
  """

  k: jax.Array
  v: jax.Array
  score: jax.Array | None = None

  @classmethod
  def zeros(cls, batch: int, length: int, num_heads: int, num_kv_heads: int, head_dim: int,
            dtype, track_scores: bool = False) -> KVCache:
    shape = (batch, length, num_kv_heads, head_dim)
    score = jnp.zeros((batch, num_heads, length), jnp.float32) if track_scores else None
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), score)

  @property
  def length(self) -> int:
    return self.k.shape[1]

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
             alibi_slopes: jax.Array | None) -> tuple[jax.Array, KVCache]:
    """Writes k, v at their positions, then attends q to every slot at or before its own.

    Args:
      q: [B, S, H, D], k, v: [B, S, Hkv, D] for S new tokens per row (a prompt or one token).
      positions: [B, S] int, consecutive within a row; also the cache slots.
      alibi_slopes: [H] ALiBi slopes, or None.

    Returns:
      ([B, S, H, D] attention output, the extended cache).
    """
    write = jax.vmap(lambda cache, new, at: jax.lax.dynamic_update_slice_in_dim(cache, new, at, 0))
    start = positions[:, 0]
    names = ("batch", "seq", "kv_heads", "kv")
    new_k = constrain(write(self.k, k.astype(self.k.dtype), start), names)
    new_v = constrain(write(self.v, v.astype(self.v.dtype), start), names)
    slots = jnp.arange(self.length)
    distance = positions[:, None, :, None] - slots  # [B, 1, S, T]
    mask = distance >= 0
    bias = None if alibi_slopes is None else (
        -alibi_slopes[:, None, None] * distance.astype(jnp.float32))
    keys, values = (repeat_kv_heads(x, q.shape[2]) for x in (new_k, new_v))
    if self.score is None:
      out = dot_product_attention(q, keys, values, bias=bias, mask=mask)
      return out, KVCache(new_k, new_v)
    weights = attention_weights(q, keys, bias, mask)
    out = jnp.einsum("bhst,bthd->bshd", weights.astype(v.dtype), values).astype(q.dtype)
    return out, KVCache(new_k, new_v, self.score + weights.sum(axis=2))


def attention_weights(q: jax.Array, k: jax.Array, bias: jax.Array | None,
                      mask: jax.Array) -> jax.Array:
  """softmax(q kᵀ/√D + bias) over allowed keys: q [B, S, H, D], k [B, T, H, D] -> [B, H, S, T]."""
  logits = jnp.einsum("bshd,bthd->bhst", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
  if bias is not None:
    logits = logits + bias
  return jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)


def cache_bytes(tree) -> int:
  """Bytes of every array in a cache pytree (what decoding keeps in memory)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
