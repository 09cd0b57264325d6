"""Memory-efficient attention: online softmax over key blocks.

Rabe & Staats 2021 ("Self-attention does not need O(n²) memory") and the
forward pass of FlashAttention (Dao et al. 2022, Alg. 1): each query block
scans the key blocks it may attend to, keeping a running max m, running sum l
and unnormalized output acc. The backward pass is FlashAttention's (Alg. 4 in
FlashAttention-2, Dao 2023): it keeps only q, k, v, the output and each row's
logsumexp, and recomputes every score block, so activation memory grows
linearly with the sequence length instead of quadratically. Key blocks that a
static mask (``causal_mask``) excludes entirely are never visited.

Same signature and result as ``attention.dot_product_attention``, to float
tolerance. A bias (ALiBi) is read block by block but is itself a [.., S, T]
array, so it stays quadratic in memory (batch-independent). The bias is a
constant: no gradient flows into it (ALiBi's has none).
"""

from __future__ import annotations

import functools

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


def _key_block(x, rows: slice, j) -> jax.Array | None:
  """x[..., rows, key block j] of a [.., S|1, T|1] bias or mask (None stays None).

  ``j`` is traced (the scan index): a dynamic slice reads the block in place,
  where slicing every query block's key range up front would copy keys,
  values and masks once per query block (quadratic memory in total).
  """
  if x is None:
    return None
  x = x[..., rows, :] if x.shape[-2] > 1 else x
  if x.shape[-1] > 1:
    x = jax.lax.dynamic_slice_in_dim(x, j * BLOCK, BLOCK, axis=x.ndim - 1)
  return x


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        bias: jax.Array | None = None,
                        mask: jax.Array | None = None) -> jax.Array:
  """softmax(q kᵀ / √d + bias) v over key blocks with an online softmax.

  Args:
    q: [B, S, H, D]; k, v: [B, T, H, D].
    bias: broadcastable to [B, H, S, T]; treated as a constant.
    mask: boolean, broadcastable to [B, H, S, T]; True where attention is allowed.

  Returns:
    [B, S, H, D] in the dtype of ``q``. Sequences that are not a multiple of
    ``BLOCK`` (or fit in one block) take the dense path, which is exact.
  """
  q_len, kv_len = q.shape[1], k.shape[1]
  if q_len % BLOCK or kv_len % BLOCK or max(q_len, kv_len) <= BLOCK:
    return dot_product_attention(q, k, v, bias=bias, mask=mask)
  ranges = tuple(_key_block_ranges(mask, q_len // BLOCK, kv_len // BLOCK))
  if bias is not None:
    bias = jax.lax.stop_gradient(bias)
  scale = q.shape[-1] ** -0.5
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * scale, k, v))  # [B, H, S, D]
  return jnp.swapaxes(_attention(q, k, v, bias, mask, ranges), 1, 2)


def _blocks_of(x: jax.Array) -> jax.Array:
  """[B, H, T, D] -> [T/BLOCK, B, H, BLOCK, D], indexed by key block."""
  b, h, _, d = x.shape
  return jnp.moveaxis(x.reshape(b, h, -1, BLOCK, d), 2, 0)


def _scores(q_i, k_j, bias_j, mask_j) -> jax.Array:
  logits = jnp.einsum("bhsd,bhtd->bhst", q_i, k_j).astype(jnp.float32)
  if bias_j is not None:
    logits = logits + bias_j
  if mask_j is not None:
    logits = jnp.where(mask_j, logits, jnp.finfo(jnp.float32).min)
  return logits


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, bias, mask, ranges):
  """Head-major attention, q pre-scaled: [B, H, S, D] -> [B, H, S, D]."""
  return _forward(q, k, v, bias, mask, ranges)[0].astype(q.dtype)


def _forward(q, k, v, bias, mask, ranges):
  """(output [B, H, S, D] float32, row logsumexp [B, H, S, 1])."""
  keys, values = _blocks_of(k), _blocks_of(v)
  outs, lses = [], []
  for i, (k0, k1) in enumerate(ranges):
    rows = slice(i * BLOCK, (i + 1) * BLOCK)
    q_i = q[:, :, rows]

    def step(carry, j, q_i=q_i, rows=rows):
      acc, peak, total = carry
      logits = _scores(q_i, keys[j], _key_block(bias, rows, j), _key_block(mask, rows, j))
      new_peak = jnp.maximum(peak, logits.max(-1, keepdims=True))
      weights = jnp.exp(logits - new_peak)
      decay = jnp.exp(peak - new_peak)
      acc = acc * decay + jnp.einsum("bhst,bhtd->bhsd", weights.astype(v.dtype),
                                     values[j]).astype(jnp.float32)
      return (acc, new_peak, total * decay + weights.sum(-1, keepdims=True)), None

    # *_like: inside shard_map (Ulysses) the carry must vary over the same axes as q.
    init = (jnp.zeros_like(q_i, jnp.float32),
            jnp.full_like(q_i[..., :1], jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros_like(q_i[..., :1], jnp.float32))
    (acc, peak, total), _ = jax.lax.scan(step, init, jnp.arange(k0, k1))
    outs.append(acc / total)
    lses.append(peak + jnp.log(total))
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _attention_fwd(q, k, v, bias, mask, ranges):
  out, lse = _forward(q, k, v, bias, mask, ranges)
  return out.astype(q.dtype), (q, k, v, bias, mask, out, lse)


def _attention_bwd(ranges, residuals, d_out):
  """dq, dk, dv from recomputed probabilities p = exp(s − lse) (FlashAttention-2, Alg. 2).

  dk and dv are carried through every query block's scan and updated one key
  block at a time, so the blocks run in sequence and nothing larger than the
  inputs is ever live.
  """
  q, k, v, bias, mask, out, lse = residuals
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out, axis=-1, keepdims=True)  # rowsum(dO ∘ O)
  keys, values = _blocks_of(k), _blocks_of(v)
  dk, dv = jnp.zeros_like(keys, jnp.float32), jnp.zeros_like(values, jnp.float32)
  dqs = []
  for i, (k0, k1) in enumerate(ranges):
    rows = slice(i * BLOCK, (i + 1) * BLOCK)
    q_i, do_i, lse_i, delta_i = (x[:, :, rows] for x in (q, d_out, lse, delta))

    def step(carry, j, q_i=q_i, do_i=do_i, lse_i=lse_i, delta_i=delta_i, rows=rows):
      dq_i, dk, dv = carry
      mask_j = _key_block(mask, rows, j)
      p = jnp.exp(_scores(q_i, keys[j], _key_block(bias, rows, j), mask_j) - lse_i)
      dp = jnp.einsum("bhsd,bhtd->bhst", do_i, values[j].astype(jnp.float32))
      ds = p * (dp - delta_i)
      if mask_j is not None:  # masked logits are constants, also in fully masked rows
        ds = jnp.where(mask_j, ds, 0.0)
      dq_i = dq_i + jnp.einsum("bhst,bhtd->bhsd", ds, keys[j].astype(jnp.float32))
      dk = dk.at[j].add(jnp.einsum("bhst,bhsd->bhtd", ds, q_i.astype(jnp.float32)))
      dv = dv.at[j].add(jnp.einsum("bhst,bhsd->bhtd", p, do_i))
      return (dq_i, dk, dv), None

    (dq_i, dk, dv), _ = jax.lax.scan(step, (jnp.zeros_like(q_i, jnp.float32), dk, dv),
                                     jnp.arange(k0, k1))
    dqs.append(dq_i)
  dq = jnp.concatenate(dqs, axis=2)
  return (dq.astype(q.dtype), _unblock(dk).astype(k.dtype), _unblock(dv).astype(v.dtype),
          None, None)


def _unblock(x: jax.Array) -> jax.Array:
  """[T/BLOCK, B, H, BLOCK, D] -> [B, H, T, D]."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(*x.shape[:2], -1, x.shape[-1])


_attention.defvjp(_attention_fwd, _attention_bwd)


ATTENTION_IMPLS["blockwise"] = blockwise_attention
