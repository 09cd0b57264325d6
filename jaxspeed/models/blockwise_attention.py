"""Memory-efficient attention: online softmax over key blocks.

Rabe & Staats 2021 ("Self-attention does not need O(n²) memory") and the
forward pass of FlashAttention (Dao et al. 2022, Alg. 1): each query block
scans the key blocks it may attend to, keeping a running max m, running sum l
and unnormalized output acc; the score block of one step is recomputed in the
backward pass (``jax.checkpoint``), so activation memory grows linearly with
the sequence length instead of quadratically. Key blocks that a static mask
(``causal_mask``) excludes entirely are never visited.

Same signature and result as ``attention.dot_product_attention``, to float
tolerance. A bias (ALiBi) is read block by block but is itself a [.., S, T]
array, so it stays quadratic in memory (batch-independent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeed.models.attention import ATTENTION_IMPLS, dot_product_attention

BLOCK = 128  # queries and keys per block


def _key_block_ranges(mask, num_q: int, num_k: int) -> list[tuple[int, int]]:
  """Per query block, the [first, last) key blocks with any allowed entry."""
  if mask is None or isinstance(mask, jax.core.Tracer):
    return [(0, num_k)] * num_q
  allowed = np.asarray(mask, bool)
  allowed = allowed.reshape(-1, *allowed.shape[-2:]).any(axis=0)
  allowed = np.broadcast_to(allowed, (num_q * BLOCK if allowed.shape[0] > 1 else 1,
                                      num_k * BLOCK if allowed.shape[1] > 1 else 1))
  ranges = []
  for i in range(num_q):
    rows = allowed[i * BLOCK:(i + 1) * BLOCK] if allowed.shape[0] > 1 else allowed
    if not rows.any(axis=1).all():  # a fully masked row attends uniformly to all keys
      ranges.append((0, num_k))
      continue
    cols = np.flatnonzero(rows.any(axis=0))
    if allowed.shape[1] == 1:
      ranges.append((0, num_k))
    else:
      ranges.append((int(cols[0]) // BLOCK, int(cols[-1]) // BLOCK + 1))
  return ranges


def _key_blocks(x, rows: slice, k0: int, k1: int):
  """x[..., rows, k0:k1 blocks] as [n, B', H', q, BLOCK] to scan over (or None)."""
  if x is None:
    return None
  x = x[..., rows, :] if x.shape[-2] > 1 else x
  x = x[..., k0 * BLOCK:k1 * BLOCK] if x.shape[-1] > 1 else x
  x = jnp.broadcast_to(x, (*x.shape[:-1], (k1 - k0) * BLOCK))
  x = x.reshape(*x.shape[:-1], k1 - k0, BLOCK)
  x = x.reshape((1,) * (5 - x.ndim) + x.shape)  # [B', H', q, n, BLOCK]
  return jnp.moveaxis(x, -2, 0)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        bias: jax.Array | None = None,
                        mask: jax.Array | None = None) -> jax.Array:
  """softmax(q kᵀ / √d + bias) v over key blocks with an online softmax.

  Args:
    q: [B, S, H, D]; k, v: [B, T, H, D].
    bias: broadcastable to [B, H, S, T].
    mask: boolean, broadcastable to [B, H, S, T]; True where attention is allowed.

  Returns:
    [B, S, H, D] in the dtype of ``q``. Sequences that are not a multiple of
    ``BLOCK`` (or fit in one block) take the dense path, which is exact.
  """
  batch, q_len, heads, dim = q.shape
  kv_len = k.shape[1]
  if q_len % BLOCK or kv_len % BLOCK or max(q_len, kv_len) <= BLOCK:
    return dot_product_attention(q, k, v, bias=bias, mask=mask)
  scale = dim ** -0.5
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * scale, k, v))  # [B, H, S, D]
  num_q, num_k = q_len // BLOCK, kv_len // BLOCK
  outs = []
  for i, (k0, k1) in enumerate(_key_block_ranges(mask, num_q, num_k)):
    rows = slice(i * BLOCK, (i + 1) * BLOCK)
    q_i = q[:, :, rows]
    keys = jnp.moveaxis(k[:, :, k0 * BLOCK:k1 * BLOCK].reshape(batch, heads, -1, BLOCK, dim),
                        2, 0)
    values = jnp.moveaxis(v[:, :, k0 * BLOCK:k1 * BLOCK].reshape(batch, heads, -1, BLOCK, dim),
                          2, 0)
    xs = (keys, values, _key_blocks(bias, rows, k0, k1), _key_blocks(mask, rows, k0, k1))

    @jax.checkpoint
    def step(carry, x, q_i=q_i):
      acc, peak, total = carry
      k_j, v_j, bias_j, mask_j = x
      logits = jnp.einsum("bhsd,bhtd->bhst", q_i, k_j).astype(jnp.float32)
      if bias_j is not None:
        logits = logits + bias_j
      if mask_j is not None:
        logits = jnp.where(mask_j, logits, jnp.finfo(jnp.float32).min)
      new_peak = jnp.maximum(peak, jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
      weights = jnp.exp(logits - new_peak)
      decay = jnp.exp(peak - new_peak)
      acc = acc * decay + jnp.einsum("bhst,bhtd->bhsd", weights.astype(v_j.dtype),
                                     v_j).astype(jnp.float32)
      return (acc, new_peak, total * decay + weights.sum(-1, keepdims=True)), None

    # *_like: inside shard_map (Ulysses) the carry must vary over the same axes as q.
    init = (jnp.zeros_like(q_i, jnp.float32),
            jnp.full_like(q_i[..., :1], jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros_like(q_i[..., :1], jnp.float32))
    (acc, _, total), _ = jax.lax.scan(step, init, xs)
    outs.append((acc / total).astype(q.dtype))
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


ATTENTION_IMPLS["blockwise"] = blockwise_attention
