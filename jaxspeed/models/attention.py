"""Scaled dot-product attention behind one small interface.

Every implementation has the signature of ``dot_product_attention`` so that a
fused kernel (blockwise, Pallas flash attention) can replace it by name from
``config.model.attention`` without touching the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Queries per block when a static mask lets whole key ranges be skipped. With
# a causal mask and S = 256 this makes two blocks and drops a quarter of the
# score matrix; smaller blocks skip more but pay per-op overhead on CPU.
QUERY_BLOCK = 128

Span = tuple[int, int, int, int]  # query start, query end, key start, key end


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None,
                          mask: jax.Array | None = None) -> jax.Array:
  """softmax(q kᵀ / √d + bias) v, with masked positions excluded.

  When ``mask`` is a concrete array (e.g. ``causal_mask``, built at trace
  time), queries are processed in blocks of ``QUERY_BLOCK`` and each block
  attends only to the key range its mask allows: the blockwise causal
  skipping of FlashAttention (Dao et al. 2022), without changing the result.

  Args:
    q: [B, S, H, D] queries.
    k: [B, T, H, D] keys.
    v: [B, T, H, D] values.
    bias: additive logits bias broadcastable to [B, H, S, T] (e.g. ALiBi).
    mask: boolean, broadcastable to [B, H, S, T]; True where attention is allowed.

  Returns:
    [B, S, H, D] attention output in the dtype of ``q``.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  spans = _static_spans(mask, q_len, kv_len) or [(0, q_len, 0, kv_len)]
  # Head-major [B, H, S, D] once for all blocks: the batched matmuls want the
  # (batch, head) axes outermost, and transposing per block would copy the
  # keys and values again for every query block.
  scale = q.shape[-1] ** -0.5
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * scale, k, v))
  outs = [_attend(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                  _block(bias, q0, q1, k0, k1), _block(mask, q0, q1, k0, k1))
          for q0, q1, k0, k1 in spans]
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return jnp.swapaxes(out, 1, 2)


def _attend(q, k, v, bias, mask) -> jax.Array:
  """One block in head-major layout: q [B, H, S, D] (pre-scaled), k, v [B, H, T, D].

  exp(logits - max) is multiplied by v unnormalized and the [B, H, S, D]
  result is divided by the row sums, as FlashAttention does: the division
  then touches D instead of T values per row, and the backward pass has no
  softmax Jacobian reduction over the [B, H, S, T] scores. The max is a
  constant for differentiation (it cancels), so gradients are exact.
  """
  logits = jnp.einsum("bhsd,bhtd->bhst", q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  peak = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  weights = jnp.exp(logits - peak)
  total = weights.sum(axis=-1, keepdims=True)  # [B, H, S, 1]
  out = jnp.einsum("bhst,bhtd->bhsd", weights.astype(v.dtype), v)
  return (out / total).astype(q.dtype)


def _static_spans(mask, q_len: int, kv_len: int) -> list[Span] | None:
  """Query blocks and the key range each needs, if ``mask`` is known at trace time.

  Returns None (attend densely) for traced masks, short sequences, or when no
  block can skip keys. A block containing a fully masked query row keeps all
  keys, so that row gets the same (uniform) weights as without blocking.
  """
  if mask is None or isinstance(mask, jax.core.Tracer) or q_len <= QUERY_BLOCK:
    return None
  allowed = np.asarray(mask, bool)
  allowed = np.broadcast_to(allowed, (*allowed.shape[:-2], q_len, kv_len))
  allowed = allowed.reshape(-1, q_len, kv_len).any(axis=0)  # [S, T] over batch and heads
  spans = []
  for q0 in range(0, q_len, QUERY_BLOCK):
    q1 = min(q0 + QUERY_BLOCK, q_len)
    rows = allowed[q0:q1]
    keys = np.flatnonzero(rows.any(axis=0))
    if not rows.any(axis=1).all() or keys.size == 0:
      spans.append((q0, q1, 0, kv_len))
    else:
      spans.append((q0, q1, int(keys[0]), int(keys[-1]) + 1))
  if all(k0 == 0 and k1 == kv_len for _, _, k0, k1 in spans):
    return None
  return spans


def _block(x, q0: int, q1: int, k0: int, k1: int):
  """Rows q0:q1 and columns k0:k1 of a [.., S, T] array broadcastable to [B, H, S, T]."""
  if x is None:
    return None
  rows = slice(q0, q1) if x.shape[-2] > 1 else slice(None)
  cols = slice(k0, k1) if x.shape[-1] > 1 else slice(None)
  return x[..., rows, cols]


def causal_mask(q_len: int, kv_len: int | None = None) -> np.ndarray:
  """[1, 1, S, T] boolean mask: query i sees keys j <= i (queries end-aligned).

  A numpy array, concrete at trace time (inside ``jax.jit`` and ``jax.shard_map``
  too), so that ``dot_product_attention`` can skip the key blocks it masks out
  entirely.
  """
  kv_len = q_len if kv_len is None else kv_len
  q_pos = np.arange(q_len)[:, None] + (kv_len - q_len)
  return (np.arange(kv_len)[None, :] <= q_pos)[None, None]


def repeat_kv_heads(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, T, Hkv, D] -> [B, T, num_heads, D]: each kv head serves its query group.

  Query head i reads kv head i // (num_heads / Hkv), as in grouped-query
  attention (Ainslie et al. 2023).
  """
  groups = num_heads // x.shape[2]
  return x if groups == 1 else jnp.repeat(x, groups, axis=2)


AttentionFn = Callable[..., jax.Array]

ATTENTION_IMPLS: dict[str, AttentionFn] = {"xla": dot_product_attention}


def get_attention(name: str) -> AttentionFn:
  """Looks up an attention implementation by ``config.model.attention``."""
  if name not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention={name!r}; allowed: {sorted(ATTENTION_IMPLS)}")
  return ATTENTION_IMPLS[name]
