"""FlashAttention forward and backward as Pallas kernels.

Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention
with IO-Awareness" (arXiv:2205.14135), and Dao 2023, "FlashAttention-2"
(arXiv:2307.08691):

* forward (FA-2 Alg. 1): each program owns one query block and scans the key
  blocks with an online softmax (running max m, running sum l, unnormalized
  output acc), then stores O = acc / l and the row logsumexp L = m + log l;
* backward (FA-2 Alg. 2): the probabilities are recomputed from L as
  P = exp(S - L), so no [S, T] matrix is kept between the passes. One kernel
  owns a key block and accumulates dK, dV over query blocks; a second owns a
  query block and accumulates dQ over key blocks (no atomics), with
  D = rowsum(dO ∘ O) computed once beforehand.

With ``causal=True`` a program visits only the key blocks its rows may see,
so about half of the blocks are skipped. An additive ``bias`` (ALiBi) is read
block by block; its gradient is computed (and the [B, H, S, T] buffer for it
allocated) only when the bias is being differentiated.

Backends: compiled with the Triton lowering on GPU, in the Pallas interpreter
elsewhere (``interpret=None`` picks). Only the interpreter has run here (no
GPU): the Triton path is written for its constraints (power-of-two block
sizes of at least 16, a power-of-two head dimension, which the wrapper pads
to) but is untested, and so are its block sizes and warp counts (Triton's
defaults). The interpreter is slow; on CPU the pure-JAX
``jaxspeed.models.blockwise_attention`` is the fast path. Under a mesh,
``jaxspeed.models.flash_attention`` maps these kernels over the batch and
head shards.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
# Triton's tl.dot needs every matmul dimension to be at least 16.
_MIN_BLOCK = 16


def use_pallas() -> bool:
  """Whether the kernels run compiled (GPU) rather than in the interpreter."""
  return jax.default_backend() == "gpu"


class _Plan(NamedTuple):
  """Static shapes of one call: real lengths, block sizes, scale, interpret."""

  q_len: int  # S before padding
  kv_len: int  # T before padding
  block_q: int
  block_k: int
  scale: float  # 1 / sqrt(real head dim)
  causal: bool
  interpret: bool

  @property
  def offset(self) -> int:
    """Causal end alignment: query i sees keys j <= i + offset (as ``causal_mask``)."""
    return self.kv_len - self.q_len


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        bias: jax.Array | None = None, causal: bool = False) -> jax.Array:
  """softmax(q kᵀ / √D + bias) v in plain JAX, materializing the scores.

  Args:
    q: [B, S, H, D]; k, v: [B, T, H, D].
    bias: additive, broadcastable to [B, H, S, T].
    causal: query i sees keys j <= i + T - S.

  Returns:
    [B, S, H, D] in the dtype of ``q``.
  """
  logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32)
  logits = logits * q.shape[-1] ** -0.5
  if bias is not None:
    logits = logits + bias
  if causal:
    s, t = q.shape[1], k.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((s, t), bool), t - s), logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhst,bthd->bshd", weights.astype(v.dtype), v).astype(q.dtype)


def _masked_logits(q, k, bias, q_start, k_start, plan: _Plan):
  """Scores of one [bq, bk] tile with padding and causal positions at -inf.

  q: [bq, D] pre-scaled; k: [bk, D]; bias: [bq or 1, bk] or None. f32 [bq, bk].
  """
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  cols = k_start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
  keep = cols < plan.kv_len
  if plan.causal:
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    keep &= cols <= rows + plan.offset
  return jnp.where(keep, s, -jnp.inf)


def _key_blocks_for(q_block, plan: _Plan, num_k: int):
  """Key blocks [0, end) that query block ``q_block`` may see."""
  if not plan.causal:
    return num_k
  last_row = (q_block + 1) * plan.block_q - 1
  return jnp.minimum(num_k, (last_row + plan.offset) // plan.block_k + 1)


def _first_query_block_for(k_block, plan: _Plan):
  """First query block whose rows may see key block ``k_block``."""
  if not plan.causal:
    return 0
  return jnp.maximum(0, (k_block * plan.block_k - plan.offset) // plan.block_q)


def _bias_tile(bias_ref, k_start, plan: _Plan):
  """[bq or 1, bk] columns of the program's bias rows, or None."""
  if bias_ref is None:
    return None
  return bias_ref[:, pl.ds(k_start, plan.block_k)]


def _forward_kernel(*refs, plan: _Plan, has_bias: bool, num_k: int):
  """Grid (B, H, S/bq). Refs: q, o [bq, D]; k, v [T, D]; bias [bq or 1, T]; lse [bq]."""
  q_ref, k_ref, v_ref, *refs = refs
  bias_ref = refs.pop(0) if has_bias else None
  o_ref, lse_ref = refs
  i = pl.program_id(2)
  q = (q_ref[...].astype(jnp.float32) * plan.scale).astype(q_ref.dtype)
  bq, d = q.shape

  def step(j, carry):
    acc, peak, total = carry
    k_start = j * plan.block_k
    keys = pl.ds(k_start, plan.block_k)
    s = _masked_logits(q, k_ref[keys, :], _bias_tile(bias_ref, k_start, plan),
                       i * plan.block_q, k_start, plan)
    new_peak = jnp.maximum(peak, s.max(axis=1))
    decay = jnp.exp(peak - new_peak)
    p = jnp.exp(s - new_peak[:, None])
    v = v_ref[keys, :]
    acc = acc * decay[:, None] + jnp.dot(p.astype(v.dtype), v,
                                         preferred_element_type=jnp.float32)
    return acc, new_peak, total * decay + p.sum(axis=1)

  # Every row sees key 0 (padded rows included), so the first tile makes the
  # running max finite and exp(-inf - peak) is 0 from then on.
  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, peak, total = jax.lax.fori_loop(0, _key_blocks_for(i, plan, num_k), step, init)
  o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
  lse_ref[...] = peak + jnp.log(total)


def _dkdv_kernel(*refs, plan: _Plan, has_bias: bool, num_q: int):
  """Grid (B, H, T/bk). Refs: q, do [S, D]; lse, delta [S]; k, v, dk, dv [bk, D];
  bias [S or 1, bk]."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
  bias_ref = refs.pop(0) if has_bias else None
  dk_ref, dv_ref = refs
  j = pl.program_id(2)
  k, v = k_ref[...], v_ref[...]

  def step(i, carry):
    dk, dv = carry
    q_start = i * plan.block_q
    rows = pl.ds(q_start, plan.block_q)
    q = (q_ref[rows, :].astype(jnp.float32) * plan.scale).astype(q_ref.dtype)
    bias = None
    if bias_ref is not None:
      bias = bias_ref[rows, :] if bias_ref.shape[0] > 1 else bias_ref[...]
    s = _masked_logits(q, k, bias, q_start, j * plan.block_k, plan)
    p = jnp.exp(s - lse_ref[rows][:, None])  # FA-2 Alg. 2: P recomputed from L
    do = do_ref[rows, :]
    dv += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[rows][:, None])
    dk += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(_first_query_block_for(j, plan), num_q, step, (zeros, zeros))
  # dk was accumulated against pre-scaled queries, so it already carries the 1/√D.
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, plan: _Plan, has_bias: bool, want_dbias: bool, num_k: int):
  """Grid (B, H, S/bq). Refs: q, do, dq [bq, D]; k, v [T, D]; lse, delta [bq];
  bias [bq or 1, T]; dbias [bq, T]."""
  q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs = refs
  bias_ref = refs.pop(0) if has_bias else None
  dq_ref, *refs = refs
  dbias_ref = refs[0] if want_dbias else None
  i = pl.program_id(2)
  q = (q_ref[...].astype(jnp.float32) * plan.scale).astype(q_ref.dtype)
  do = do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def step(j, dq):
    k_start = j * plan.block_k
    keys = pl.ds(k_start, plan.block_k)
    k = k_ref[keys, :]
    s = _masked_logits(q, k, _bias_tile(bias_ref, k_start, plan), i * plan.block_q,
                       k_start, plan)
    p = jnp.exp(s - lse[:, None])
    dp = jnp.dot(do, v_ref[keys, :].T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])  # dLoss/dS, which is also dLoss/dbias
    if dbias_ref is not None:
      dbias_ref[:, keys] = ds.astype(dbias_ref.dtype)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  end = _key_blocks_for(i, plan, num_k)
  dq = jax.lax.fori_loop(0, end, step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * plan.scale).astype(dq_ref.dtype)
  if dbias_ref is not None:
    def clear(j, _):  # skipped (fully masked) tiles have zero gradient
      dbias_ref[:, pl.ds(j * plan.block_k, plan.block_k)] = jnp.zeros(
          (plan.block_q, plan.block_k), dbias_ref.dtype)
    jax.lax.fori_loop(end, num_k, clear, None)


def _bias_spec(bias: jax.Array, rows: int, cols: int, by_query_block: bool) -> pl.BlockSpec:
  """Block of a [B or 1, H or 1, S or 1, T] bias; size-1 axes broadcast via index 0.

  ``by_query_block`` grids over query blocks of ``rows`` (all ``cols`` keys),
  otherwise over key blocks of ``cols`` (all ``rows`` queries).
  """
  nb, nh, ns, _ = bias.shape
  row_block = rows if ns > 1 else 1

  def index(b, h, blk):
    b, h = (b if nb > 1 else 0), (h if nh > 1 else 0)
    return (b, h, blk if by_query_block and ns > 1 else 0, 0 if by_query_block else blk)

  return pl.BlockSpec((None, None, row_block, cols), index)


def _forward(q, k, v, bias, plan: _Plan):
  """Padded q [B, S, H, D], k, v [B, T, H, D] → (o [B, S, H, D], lse [B, H, S] f32)."""
  batch, s, heads, d = q.shape
  t = k.shape[1]
  grid = (batch, heads, s // plan.block_q)
  q_spec = pl.BlockSpec((None, plan.block_q, None, d), lambda b, h, i: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, t, None, d), lambda b, h, i: (b, 0, h, 0))
  in_specs = [q_spec, kv_spec, kv_spec]
  args = [q, k, v]
  if bias is not None:
    in_specs.append(_bias_spec(bias, plan.block_q, t, by_query_block=True))
    args.append(bias)
  kernel = functools.partial(_forward_kernel, plan=plan, has_bias=bias is not None,
                             num_k=t // plan.block_k)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[q_spec,
                 pl.BlockSpec((None, None, plan.block_q), lambda b, h, i: (b, h, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, s), jnp.float32)],
      interpret=plan.interpret,
  )(*args)


def _backward(q, k, v, bias, o, lse, do, plan: _Plan, want_dbias: bool):
  """Padded inputs → (dq, dk, dv, dbias [B, H, S, T] f32 or None)."""
  batch, s, heads, d = q.shape
  t = k.shape[1]
  num_q, num_k = s // plan.block_q, t // plan.block_k
  has_bias = bias is not None
  # D_i = rowsum(dO ∘ O) (FA-2 Alg. 2, line 4): linear in S, once for both kernels.
  delta = jnp.einsum("bshd,bshd->bhs", do.astype(jnp.float32), o.astype(jnp.float32))

  full_q = pl.BlockSpec((None, s, None, d), lambda b, h, j: (b, 0, h, 0))
  full_rows = pl.BlockSpec((None, None, s), lambda b, h, j: (b, h, 0))
  key_block = pl.BlockSpec((None, plan.block_k, None, d), lambda b, h, j: (b, j, h, 0))
  in_specs = [full_q, key_block, key_block, full_q, full_rows, full_rows]
  args = [q, k, v, do, lse, delta]
  if has_bias:
    in_specs.append(_bias_spec(bias, s, plan.block_k, by_query_block=False))
    args.append(bias)
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, plan=plan, has_bias=has_bias, num_q=num_q),
      grid=(batch, heads, num_k),
      in_specs=in_specs,
      out_specs=[key_block, key_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=plan.interpret,
  )(*args)

  query_block = pl.BlockSpec((None, plan.block_q, None, d), lambda b, h, i: (b, i, h, 0))
  full_kv = pl.BlockSpec((None, t, None, d), lambda b, h, i: (b, 0, h, 0))
  row_block = pl.BlockSpec((None, None, plan.block_q), lambda b, h, i: (b, h, i))
  in_specs = [query_block, full_kv, full_kv, query_block, row_block, row_block]
  args = [q, k, v, do, lse, delta]
  if has_bias:
    in_specs.append(_bias_spec(bias, plan.block_q, t, by_query_block=True))
    args.append(bias)
  out_specs = [query_block]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if want_dbias:
    out_specs.append(pl.BlockSpec((None, None, plan.block_q, t), lambda b, h, i: (b, h, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, s, t), jnp.float32))
  dq, *dbias = pl.pallas_call(
      functools.partial(_dq_kernel, plan=plan, has_bias=has_bias, want_dbias=want_dbias,
                        num_k=num_k),
      grid=(batch, heads, num_q),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=plan.interpret,
  )(*args)
  return dq, dk, dv, (dbias[0] if want_dbias else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, bias, plan: _Plan):
  return _forward(q, k, v, bias, plan)[0]


def _flash_fwd(q, k, v, bias, plan: _Plan):
  # symbolic_zeros: each primal arrives as (value, perturbed), so the bias
  # gradient and its [B, H, S, T] buffer exist only when the bias is trained.
  q, k, v, bias_in = q.value, k.value, v.value, bias
  bias = None if bias_in is None else bias_in.value
  o, lse = _forward(q, k, v, bias, plan)
  bias_for_grad = bias if bias_in is not None and bias_in.perturbed else None
  return o, (q, k, v, bias, bias_for_grad, o, lse)


def _flash_bwd(plan: _Plan, residuals, do):
  q, k, v, bias, bias_for_grad, o, lse = residuals
  want_dbias = bias_for_grad is not None
  dq, dk, dv, dbias = _backward(q, k, v, bias, o, lse, do, plan, want_dbias)
  if not want_dbias:
    return dq, dk, dv, None  # no bias, or a constant one: a symbolic zero
  # Sum the per-(batch, head, row) gradient over the axes the bias broadcasts.
  axes = tuple(a for a in range(4) if bias.shape[a] == 1 and dbias.shape[a] > 1)
  return dq, dk, dv, dbias.sum(axis=axes, keepdims=True).astype(bias.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


def _next_power_of_two(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(n)))


def _block_size(block: int, length: int, name: str) -> int:
  if block < _MIN_BLOCK or block & (block - 1):
    raise ValueError(f"{name}={block}; must be a power of two >= {_MIN_BLOCK}")
  # A short sequence gets one block, rounded up to a power of two.
  return min(block, max(_MIN_BLOCK, _next_power_of_two(length)))


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths)


def as_4d_bias(bias: jax.Array, batch: int, heads: int, s: int, t: int) -> jax.Array:
  """The kernels' bias layout: broadcastable to [B, H, S, T] → [B or 1, H or 1, S or 1, T].

  Size-1 batch, head and query axes stay size 1 (the kernels read index 0);
  the key axis is broadcast to T, since each program reads a row of keys.

  Raises:
    ValueError: if ``bias`` does not broadcast to [B, H, S, T].
  """
  bias = jnp.asarray(bias)
  if bias.ndim > 4:
    raise ValueError(f"bias must broadcast to [B, H, S, T], got shape {bias.shape}")
  bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  full = (batch, heads, s, t)
  for have, want in zip(bias.shape, full):
    if have not in (1, want):
      raise ValueError(f"bias shape {bias.shape} does not broadcast to [B, H, S, T] = {full}")
  return jnp.broadcast_to(bias, (*bias.shape[:3], t))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                    bias: jax.Array | None = None, causal: bool = False,
                    block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                    interpret: bool | None = None) -> jax.Array:
  """softmax(q kᵀ / √D + bias) v by the FlashAttention kernels, differentiable.

  Sequences are zero-padded to a multiple of the block sizes inside (padded
  keys are masked, padded query rows dropped), and the head dimension to a
  power of two; results equal ``attention_reference`` to float tolerance.

  Args:
    q: [B, S, H, D] queries.
    k: [B, T, H, D] keys (as many heads as ``q``).
    v: [B, T, H, D] values.
    bias: additive logits bias broadcastable to [B, H, S, T], e.g. ALiBi
      [1, H, S, T]; differentiable. Axes of size 1 stay unmaterialized except
      the key axis.
    causal: query i sees keys j <= i + T - S (``causal_mask``); key blocks a
      query block cannot see are skipped. Needs S <= T.
    block_q: queries per program, a power of two >= 16.
    block_k: keys per inner step, a power of two >= 16.
    interpret: run in the Pallas interpreter; default: unless on GPU.

  Returns:
    [B, S, H, D] in the dtype of ``q``.
  """
  batch, s, heads, d = q.shape
  t = k.shape[1]
  if k.shape != (batch, t, heads, d) or v.shape != k.shape:
    raise ValueError(f"need q [B, S, H, D] and k, v [B, T, H, D]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if causal and s > t:
    raise ValueError(f"causal attention needs S <= T (no query without keys), got S={s}, T={t}")
  plan = _Plan(q_len=s, kv_len=t, block_q=_block_size(block_q, s, "block_q"),
               block_k=_block_size(block_k, t, "block_k"), scale=d ** -0.5, causal=causal,
               interpret=not use_pallas() if interpret is None else interpret)
  s_pad = -(-s // plan.block_q) * plan.block_q
  t_pad = -(-t // plan.block_k) * plan.block_k
  d_pad = max(_MIN_BLOCK, _next_power_of_two(d))
  q = _pad_axis(_pad_axis(q, 1, s_pad), 3, d_pad)
  k, v = (_pad_axis(_pad_axis(x, 1, t_pad), 3, d_pad) for x in (k, v))
  if bias is not None:
    bias = as_4d_bias(bias, batch, heads, s, t)
    bias = _pad_axis(_pad_axis(bias, 3, t_pad), 2, s_pad if bias.shape[2] > 1 else 1)
  return _flash(q, k, v, bias, plan)[:, :s, :, :d]


def _mask_as_causal(mask, q_len: int, kv_len: int) -> bool | None:
  """True if a concrete ``mask`` is ``causal_mask(S, T)`` broadcast, False if it
  allows everything, None otherwise (another mask, or traced)."""
  if isinstance(mask, jax.core.Tracer):
    return None
  allowed = np.asarray(mask, bool)
  allowed = np.broadcast_to(allowed, (*allowed.shape[:-2], q_len, kv_len))
  allowed = allowed.reshape(-1, q_len, kv_len)
  if allowed.all():
    return False
  causal = np.tril(np.ones((q_len, kv_len), bool), kv_len - q_len)
  return True if (allowed == causal).all() else None


def mask_to_causal_and_bias(mask: jax.Array | None, bias: jax.Array | None, q_len: int,
                            kv_len: int) -> tuple[bool, jax.Array | None]:
  """Maps ``dot_product_attention``'s (bias, mask) onto the kernel's (causal, bias).

  The mask becomes the causal flag when it is ``causal_mask(S, T)`` known at
  trace time (key blocks skipped, no [S, T] array), or disappears when it
  allows everything. Any other mask (a padding mask, or a traced one such as
  under ``model.remat``, whose values are unknown when tracing) is applied
  exactly as an additive finfo.min at masked positions, which gives fully
  masked rows uniform weights as ``dot_product_attention`` does; that costs a
  bias array of the mask's broadcast shape and visits all blocks.

  Args:
    mask: boolean, broadcastable to [B, H, S, T]; True where attention is allowed.
    bias: broadcastable to [B, H, S, T], or None.
    q_len: S.
    kv_len: T.

  Returns:
    (causal, bias) for ``flash_attention``.
  """
  if mask is None:
    return False, bias
  causal = _mask_as_causal(mask, q_len, kv_len)
  if causal is not None:
    return causal, bias
  masked = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
  return False, masked if bias is None else bias + masked


def flash_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                bias: jax.Array | None = None,
                                mask: jax.Array | None = None) -> jax.Array:
  """``dot_product_attention``'s interface on the flash kernels.

  The mask is handled by ``mask_to_causal_and_bias``. Runs compiled on GPU
  and in the (slow) Pallas interpreter elsewhere. Under a mesh, use
  ``jaxspeed.models.flash_attention`` (``model.attention=flash``), which maps
  this over the batch and head shards.

  Args:
    q: [B, S, H, D]; k, v: [B, T, H, D].
    bias: broadcastable to [B, H, S, T].
    mask: boolean, broadcastable to [B, H, S, T]; True where attention is allowed.

  Returns:
    [B, S, H, D] in the dtype of ``q``.
  """
  causal, bias = mask_to_causal_and_bias(mask, bias, q.shape[1], k.shape[1])
  return flash_attention(q, k, v, bias=bias, causal=causal)
