"""Scaled dot-product attention behind one small interface.

Every implementation has the signature of ``dot_product_attention`` so that a
fused kernel (blockwise, Pallas flash attention) can replace it by name from
``config.model.attention`` without touching the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None,
                          mask: jax.Array | None = None) -> jax.Array:
  """softmax(q kᵀ / √d + bias) v, with masked positions excluded.

  Args:
    q: [B, S, H, D] queries.
    k: [B, T, H, D] keys.
    v: [B, T, H, D] values.
    bias: additive logits bias broadcastable to [B, H, S, T] (e.g. ALiBi).
    mask: boolean, broadcastable to [B, H, S, T]; True where attention is allowed.

  Returns:
    [B, S, H, D] attention output in the dtype of ``q``.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bshd,bthd->bhst", q * scale, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhst,bthd->bshd", weights, v)


def causal_mask(q_len: int, kv_len: int | None = None) -> jax.Array:
  """[1, 1, S, T] boolean mask: query i sees keys j <= i (queries end-aligned)."""
  kv_len = q_len if kv_len is None else kv_len
  q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  return (jnp.arange(kv_len)[None, :] <= q_pos)[None, None]


AttentionFn = Callable[..., jax.Array]

ATTENTION_IMPLS: dict[str, AttentionFn] = {"xla": dot_product_attention}


def get_attention(name: str) -> AttentionFn:
  """Looks up an attention implementation by ``config.model.attention``."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention={name!r}; allowed: {sorted(ATTENTION_IMPLS)}")
  return ATTENTION_IMPLS[name]
