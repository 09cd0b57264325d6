"""Evoformer attention: row-batched attention with row-broadcast biases.

DeepSpeed4Science's EvoformerAttention (Song et al. 2023, arXiv 2310.04610)
for AlphaFold-style MSA and triangle attention. Each of the R rows of a
[B, R, N, H, D] tensor attends over its own N positions,

    O[b, r] = softmax(Q[b, r] K[b, r]ᵀ / √D + pair_bias[b] + mask_bias[b, r]) V[b, r],

with a pair bias [B, 1, H, N, N] shared by all rows and a mask bias
[B, R, 1, 1, N] shared by all heads and queries. Materializing the logits
costs B·R·H·N² floats, kept for the backward pass; ``evoformer_attention``
never forms them: it scans key blocks with an online softmax (Rabe & Staats
2021; FlashAttention, Dao et al. 2022) and its backward recomputes each block
from the row logsumexp (FlashAttention-2, Dao 2023, Alg. 2). The pair-bias
gradient is that block's dS summed over rows, accumulated one key block at a
time, so only the inputs, their gradients and one [B, R, H, N, block] tile are
live. ``jaxspeed.models.blockwise_attention`` cannot serve here: it treats its
bias as a constant (no gradient) and has no row axis to broadcast over.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import flash_attention

KEY_BLOCK = 64  # keys per scan step: the live tile is [B, R, H, N, KEY_BLOCK]


def evoformer_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                  pair_bias: jax.Array | None = None,
                                  mask_bias: jax.Array | None = None) -> jax.Array:
  """The same attention in plain JAX, materializing the [B, R, H, N, N] logits.

  Args:
    q, k, v: [B, R, N, H, D].
    pair_bias: [B, 1, H, N, N] or None.
    mask_bias: [B, R, 1, 1, N] or None, e.g. 1e9·(mask − 1).

  Returns:
    [B, R, N, H, D] in the dtype of ``q``.
  """
  logits = jnp.einsum("brshd,brthd->brhst", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  for bias in (pair_bias, mask_bias):
    if bias is not None:
      logits = logits + bias
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("brhst,brthd->brshd", weights.astype(v.dtype), v).astype(q.dtype)


def _check_shapes(q, k, v, pair_bias, mask_bias) -> None:
  b, r, n, h, _ = q.shape
  if k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"need q, k, v of one shape [B, R, N, H, D]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if pair_bias is not None and pair_bias.shape != (b, 1, h, n, n):
    raise ValueError(f"pair_bias must be [B, 1, H, N, N] = {(b, 1, h, n, n)}, "
                     f"got {pair_bias.shape}")
  if mask_bias is not None and mask_bias.shape != (b, r, 1, 1, n):
    raise ValueError(f"mask_bias must be [B, R, 1, 1, N] = {(b, r, 1, 1, n)}, "
                     f"got {mask_bias.shape}")


def evoformer_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        pair_bias: jax.Array | None = None,
                        mask_bias: jax.Array | None = None,
                        key_block: int = KEY_BLOCK) -> jax.Array:
  """softmax(q kᵀ / √D + pair_bias + mask_bias) v per row, over key blocks.

  Exact gradients for q, k, v and both biases (each summed over the axes it
  broadcasts). Memory beyond inputs and gradients: one [B, R, H, N, key_block]
  tile, linear in N per row.

  Args:
    q, k, v: [B, R, N, H, D]; any N (keys are padded to a block and masked).
    pair_bias: [B, 1, H, N, N], shared by the R rows, or None.
    mask_bias: [B, R, 1, 1, N], shared by heads and queries, or None.
    key_block: keys per scan step.

  Returns:
    [B, R, N, H, D] in the dtype of ``q``.
  """
  _check_shapes(q, k, v, pair_bias, mask_bias)
  if key_block < 1:
    raise ValueError(f"key_block must be >= 1, got {key_block}")
  n = q.shape[2]
  block = min(key_block, n)
  padded = -(-n // block) * block
  # Head-major [B, R, H, N, D]; keys padded to whole blocks. ``key_valid``
  # sets padded keys' logits to finfo.min: zero weight, zero gradient.
  q, k, v = (jnp.swapaxes(x, 2, 3) for x in (q * q.shape[-1] ** -0.5, k, v))
  pad = padded - n
  k, v = (jnp.pad(x, [(0, 0)] * 3 + [(0, pad), (0, 0)]) for x in (k, v))
  key_valid = jnp.arange(padded) < n
  if pair_bias is not None:
    pair_bias = jnp.pad(pair_bias, [(0, 0)] * 4 + [(0, pad)])
  if mask_bias is not None:
    mask_bias = jnp.pad(mask_bias, [(0, 0)] * 4 + [(0, pad)])
  out = _attention(q, k, v, pair_bias, mask_bias, key_valid, block)
  return jnp.swapaxes(out, 2, 3)


def evoformer_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, *,
                               pair_bias: jax.Array | None = None,
                               mask_bias: jax.Array | None = None,
                               interpret: bool | None = None) -> jax.Array:
  """The same attention on the Pallas FlashAttention kernels, one row at a time.

  Each row is one ``flash_attention`` call (forward with the row logsumexp,
  FA-2 backward with the bias gradient) inside a ``lax.scan`` over R, whose
  backward adds each row's pair-bias gradient into one [B, 1, H, N, N]
  accumulator. The row is rematerialized (``jax.checkpoint``), so the scan
  keeps only its inputs: neither the per-row bias pair_bias + mask_bias nor
  its gradient is ever stacked over R. The kernel still writes one row's
  [B, H, N, N] bias gradient before it is added (the row sum is not fused
  into the kernel). Runs in the Pallas interpreter off GPU; the compiled GPU
  path is untested.

  Args:
    q, k, v: [B, R, N, H, D].
    pair_bias: [B, 1, H, N, N] or None.
    mask_bias: [B, R, 1, 1, N] or None.
    interpret: as ``flash_attention``'s (default: unless on GPU).

  Returns:
    [B, R, N, H, D] in the dtype of ``q``.
  """
  _check_shapes(q, k, v, pair_bias, mask_bias)

  @jax.checkpoint
  def row(q, k, v, mask):  # q, k, v [B, N, H, D]; mask [B, 1, 1, N] or None
    biases = [b for b in (None if pair_bias is None else pair_bias[:, 0], mask) if b is not None]
    bias = sum(biases[1:], biases[0]) if biases else None
    return flash_attention(q, k, v, bias=bias, interpret=interpret)

  rows = tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (q, k, v, mask_bias))
  _, out = jax.lax.scan(lambda carry, xs: (carry, row(*xs)), None, rows)
  return jnp.moveaxis(out, 0, 1)


def _kv_blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, R, H, T, D] -> [T/block, B, R, H, block, D], scanned over key blocks."""
  return jnp.moveaxis(x.reshape(*x.shape[:3], -1, block, x.shape[-1]), 3, 0)


def _unblock_kv(x: jax.Array) -> jax.Array:
  """[T/block, B, R, H, block, D] -> [B, R, H, T, D]."""
  x = jnp.moveaxis(x, 0, 3)
  return x.reshape(*x.shape[:3], -1, x.shape[-1])


def _key_slice(x: jax.Array | None, j, block: int) -> jax.Array | None:
  """Key block ``j`` (traced) of a [..., T] bias, read in place (no blocked copy)."""
  if x is None:
    return None
  return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=x.ndim - 1)


def _logits(q, k_j, pair_j, mask_j, valid_j) -> jax.Array:
  """One key block's f32 logits [B, R, H, N, block]; q is pre-scaled."""
  s = jnp.einsum("brhsd,brhtd->brhst", q, k_j, preferred_element_type=jnp.float32)
  for bias in (pair_j, mask_j):
    if bias is not None:
      s = s + bias.astype(jnp.float32)
  return jnp.where(valid_j, s, jnp.finfo(jnp.float32).min)


def _scan_inputs(k, v, block):
  """Per key block: (index, keys, values); biases are sliced by index."""
  return jnp.arange(k.shape[3] // block), _kv_blocks(k, block), _kv_blocks(v, block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, pair_bias, mask_bias, key_valid, block):
  """Head-major [B, R, H, N, D] (q pre-scaled, keys padded) -> [B, R, H, N, D]."""
  return _forward(q, k, v, pair_bias, mask_bias, key_valid, block)[0]


def _forward(q, k, v, pair_bias, mask_bias, key_valid, block):
  """(output in q's dtype, row logsumexp [B, R, H, N, 1] f32)."""

  def step(carry, xs):
    acc, peak, total = carry
    j, k_j, v_j = xs
    s = _logits(q, k_j, *(_key_slice(x, j, block) for x in (pair_bias, mask_bias, key_valid)))
    new_peak = jnp.maximum(peak, s.max(-1, keepdims=True))
    p = jnp.exp(s - new_peak)
    decay = jnp.exp(peak - new_peak)
    acc = acc * decay + jnp.einsum("brhst,brhtd->brhsd", p.astype(v_j.dtype), v_j,
                                   preferred_element_type=jnp.float32)
    return (acc, new_peak, total * decay + p.sum(-1, keepdims=True)), None

  init = (jnp.zeros(q.shape, jnp.float32),
          jnp.full((*q.shape[:-1], 1), jnp.finfo(jnp.float32).min, jnp.float32),
          jnp.zeros((*q.shape[:-1], 1), jnp.float32))
  (acc, peak, total), _ = jax.lax.scan(step, init, _scan_inputs(k, v, block))
  return (acc / total).astype(q.dtype), peak + jnp.log(total)


def _attention_fwd(q, k, v, pair_bias, mask_bias, key_valid, block):
  out, lse = _forward(q, k, v, pair_bias, mask_bias, key_valid, block)
  return out, (q, k, v, pair_bias, mask_bias, key_valid, out, lse)


def _attention_bwd(block, residuals, d_out):
  """FlashAttention-2 backward, one key block per step; P = exp(S − L) recomputed.

  dS of a block is also the gradient of every bias at that block; summed over
  rows it is the pair bias's, over heads and queries the mask bias's.
  """
  q, k, v, pair_bias, mask_bias, key_valid, out, lse = residuals
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True)  # rowsum(dO ∘ O)

  def step(carry, xs):
    dq, d_pair, d_mask = carry
    j, k_j, v_j = xs
    pair_j, mask_j, valid_j = (_key_slice(x, j, block) for x in (pair_bias, mask_bias, key_valid))
    p = jnp.exp(_logits(q, k_j, pair_j, mask_j, valid_j) - lse)
    dp = jnp.einsum("brhsd,brhtd->brhst", d_out, v_j.astype(jnp.float32))
    ds = p * (dp - delta)
    dq = dq + jnp.einsum("brhst,brhtd->brhsd", ds, k_j.astype(jnp.float32))
    dk_j = jnp.einsum("brhst,brhsd->brhtd", ds, q.astype(jnp.float32))
    dv_j = jnp.einsum("brhst,brhsd->brhtd", p, d_out)
    # Each key block's bias gradient is written once, in place in the carry.
    if d_pair is not None:
      d_pair = jax.lax.dynamic_update_slice_in_dim(
          d_pair, ds.sum(axis=1, keepdims=True), j * block, axis=4)
    if d_mask is not None:
      d_mask = jax.lax.dynamic_update_slice_in_dim(
          d_mask, ds.sum(axis=(2, 3), keepdims=True), j * block, axis=4)
    return (dq, d_pair, d_mask), (dk_j, dv_j)

  zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
  init = (jnp.zeros(q.shape, jnp.float32), zeros(pair_bias), zeros(mask_bias))
  (dq, d_pair, d_mask), (dk, dv) = jax.lax.scan(step, init, _scan_inputs(k, v, block))
  # q was pre-scaled outside the custom_vjp, so the chain rule through the
  # scale happens there.
  d_pair = None if d_pair is None else d_pair.astype(pair_bias.dtype)
  d_mask = None if d_mask is None else d_mask.astype(mask_bias.dtype)
  return (dq.astype(q.dtype), _unblock_kv(dk).astype(k.dtype), _unblock_kv(dv).astype(v.dtype),
          d_pair, d_mask, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
