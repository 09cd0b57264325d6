"""Transformer building blocks with logically named parameter and activation axes.

Parameters are boxed with ``nn.with_logical_partitioning``; activations are
constrained with ``nn.with_logical_constraint``. The names are mapped onto the
mesh by ``jaxspeed.parallel.rules``; nothing here knows the mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.models.attention import get_attention, repeat_kv_heads
from jaxspeed.models.config import REMAT_POLICIES, ModelConfig
from jaxspeed.models.positions import alibi_bias, alibi_slopes, apply_rope
from jaxspeed.parallel.ulysses import full_sequence, sequence_parallel_size, ulysses_attention

INIT_STD = 0.02


def param_init(names: tuple[str | None, ...], std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros_init(names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, names)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in float32 (``layer_norm``)."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("embed",)), (d,))
    bias = self.param("bias", zeros_init(("embed",)), (d,))
    return layer_norm(x, scale, bias, self.eps)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) · scale + bias over the last axis (Ba et al. 2016).

  Statistics are taken in float32 and the result is cast back to ``x.dtype``.
  """
  return _layer_norm(x.astype(jnp.float32), scale, bias, eps).astype(x.dtype)


def _normalize(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  centered = x - x.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
  return centered * rstd, rstd


# A hand-written backward: autodiff of the forward re-derives the mean and
# variance chains and, on XLA:CPU, materializes several broadcasts of the
# [N, 1] statistics; this closed form reads each [N, d] array once.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
  return _normalize(x, eps)[0] * scale + bias


def _layer_norm_fwd(x, scale, bias, eps):
  xhat, rstd = _normalize(x, eps)
  return xhat * scale + bias, (xhat, rstd, scale)


def _layer_norm_bwd(eps, res, dy):
  del eps
  xhat, rstd, scale = res
  g = dy * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  rows = tuple(range(dy.ndim - 1))
  return dx, _sum_to_axes_of(scale, (dy * xhat).sum(rows)), _sum_to_axes_of(scale, dy.sum(rows))


def _sum_to_axes_of(param: jax.Array, grad: jax.Array) -> jax.Array:
  """grad summed over the manual axes it varies over and ``param`` does not.

  Inside a ``shard_map`` (e.g. a pipeline stage on sequence shards) a
  parameter the same on every sequence shard gets its gradient summed over
  them; autodiff does this itself, a custom backward rule must say so.
  """
  varying = lambda x: jax.typeof(x).manual_axis_type.varying
  extra = tuple(sorted(varying(grad) - varying(param)))
  return jax.lax.psum(grad, extra) if extra else grad


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# (x [..., d_in], w [d_in, d_out], name) -> [..., d_out]: replaces every weight
# matmul while `intercept_dense` is active. Compression (QAT fake quantization,
# integer execution) lives in such a function, so no model code is duplicated.
DenseInterceptor = Callable[[jax.Array, jax.Array, tuple[str, ...]], jax.Array]
_DENSE_INTERCEPTOR: contextvars.ContextVar[DenseInterceptor | None] = contextvars.ContextVar(
    "dense_interceptor", default=None)


@contextlib.contextmanager
def intercept_dense(fn: DenseInterceptor | None) -> Iterator[None]:
  """Routes ``dense`` calls traced inside the block through ``fn`` (None: no-op).

  The interceptor is read while tracing, so enter the block inside the jitted
  function (``jax.jit`` reuses traces per function and would not see a block
  entered around an already traced function).
  """
  token = _DENSE_INTERCEPTOR.set(fn)
  try:
    yield
  finally:
    _DENSE_INTERCEPTOR.reset(token)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., d_in] @ w [d_in, d_out], as one 2-D matmul when the sequence is whole.

  Contracting a [B, S, d] activation over (B, S) for the weight gradient makes
  XLA:CPU transpose it to [d, B·S] first; with the leading axes merged, the
  backward matmuls read both operands in place. Under sequence parallelism
  the merge would interleave the batch and sequence splits, and XLA would
  all-gather the activation to do it, so the axes stay apart.
  """
  if sequence_parallel_size() > 1:
    return x @ w
  y = x.reshape(-1, x.shape[-1]) @ w
  return y.reshape(*x.shape[:-1], w.shape[-1])


def dense(x: jax.Array, w: jax.Array, name: tuple[str, ...] = ()) -> jax.Array:
  """``matmul(x, w)``, or the active interceptor's version of it.

  Args:
    x: [..., d_in] activations.
    w: [d_in, d_out] weight.
    name: the weight's path in the params tree (module path + param name),
      which interceptors match against their layer patterns.
  """
  fn = _DENSE_INTERCEPTOR.get()
  return matmul(x, w) if fn is None else fn(x, w, name)


class Attention(nn.Module):
  """Multi-head attention; heads are split over ``tensor`` (Megatron column/row).

  The q/k/v projections are column-parallel (sharded output heads) and the
  output projection is row-parallel (sharded input heads), so the only
  tensor-parallel collective is one all-reduce after the output projection.
  With ``num_kv_heads < num_heads`` it is grouped-query attention (Ainslie et
  al. 2023): each kv head serves num_heads / num_kv_heads query heads. On a
  mesh with a ``sequence`` axis the attention itself runs DeepSpeed-Ulysses.
  """

  config: ModelConfig
  causal: bool
  # Rows' positions differ (Random-LTD keeps different tokens per row), so
  # ALiBi needs one bias per row instead of the one of row 0.
  per_row_positions: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
               deterministic: bool, cache=None):
    """x: [B, S, d_model]; positions: [B, S]; mask: broadcastable to [B, H, S, S].

    With a KV ``cache`` (see ``jaxspeed.inference``), the new keys and values
    are written into it and the queries attend to the cache instead of to
    ``mask``; returns ``(y, new_cache)``. Without one, returns ``y``.
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    h, hd = cfg.num_heads, cfg.head_dim

    def project(name: str, heads: int, axis: str) -> jax.Array:
      w = self.param(name, param_init(("embed", axis, "kv")), (cfg.d_model, heads, hd))
      b = self.param(f"{name}_bias", zeros_init((axis, "kv")), (heads, hd))
      y = dense(x, w.reshape(cfg.d_model, heads * hd).astype(dtype), (*self.path, name))
      y = y.reshape(*x.shape[:-1], heads, hd)
      return constrain(y + b.astype(dtype), ("batch", "seq", axis, "kv"))

    q = project("query", h, "heads")
    k, v = (project(name, cfg.kv_heads, "kv_heads") for name in ("key", "value"))
    bias = None
    if cfg.position == "rope":
      q, k = apply_rope(q, positions), apply_rope(k, positions)
    if cache is not None:
      # The cache stores the kv heads and each key's position (it builds ALiBi's bias).
      slopes = alibi_slopes(h) if cfg.position == "alibi" else None
      out, cache = cache.attend(q, k, v, positions, slopes)
    else:
      if cfg.position == "alibi":
        rows = full_sequence(positions if self.per_row_positions else positions[0])
        bias = alibi_bias(h, rows, rows)
      impl = get_attention(cfg.attention)

      def attend(q, k, v, **masks):
        return impl(q, repeat_kv_heads(k, q.shape[2]), repeat_kv_heads(v, q.shape[2]), **masks)

      if sequence_parallel_size() > 1:
        out = ulysses_attention(attend, q, k, v, bias=bias, mask=mask)
      else:
        out = attend(q, k, v, bias=bias, mask=mask)
    out = constrain(out, ("batch", "seq", "heads", "kv"))
    wo = self.param("out", param_init(("heads", "kv", "embed")), (h, hd, cfg.d_model))
    bo = self.param("out_bias", zeros_init(("embed",)), (cfg.d_model,))
    out = out.reshape(*out.shape[:-2], h * hd)
    y = dense(out, wo.reshape(h * hd, cfg.d_model).astype(dtype), (*self.path, "out"))
    y = y + bo.astype(dtype)
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    y = constrain(y, ("batch", "seq", "embed"))
    return y if cache is None else (y, cache)


class Mlp(nn.Module):
  """d_model → d_ff (GELU) → d_model; column- then row-parallel over ``tensor``."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    dtype = cfg.compute_dtype
    w1 = self.param("wi", param_init(("embed", "mlp")), (cfg.d_model, cfg.d_ff))
    b1 = self.param("wi_bias", zeros_init(("mlp",)), (cfg.d_ff,))
    w2 = self.param("wo", param_init(("mlp", "embed")), (cfg.d_ff, cfg.d_model))
    b2 = self.param("wo_bias", zeros_init(("embed",)), (cfg.d_model,))
    h = dense(x, w1.astype(dtype), (*self.path, "wi")) + b1.astype(dtype)
    h = jax.nn.gelu(h, approximate=cfg.gelu_approximate)
    h = constrain(h, ("batch", "seq", "mlp"))
    y = dense(h, w2.astype(dtype), (*self.path, "wo")) + b2.astype(dtype)
    y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
    return constrain(y, ("batch", "seq", "embed"))


# config -> the feed-forward module of a ``Block``, ``(x [B, S, d], deterministic) -> [B, S, d]``.
# Called inside the block, so its parameters live under the block's (e.g. the
# experts ``jaxspeed.moe`` provides for its layers).
FeedForward = Callable[[ModelConfig], nn.Module]


class Block(nn.Module):
  """One transformer layer: pre-LN (GPT) or post-LN (BERT).

  ``feed_forward`` builds the layer's feed-forward module; None for the dense ``Mlp``.
  """

  config: ModelConfig
  causal: bool
  pre_ln: bool
  per_row_positions: bool = False
  feed_forward: FeedForward | None = None

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | None,
               deterministic: bool, branch_scale: jax.Array | None = None, cache=None):
    """x: [B, S, d_model]; positions: [B, S]; mask: broadcastable to [B, H, S, S].

    ``branch_scale`` (a scalar) multiplies both residual branches before they
    are added; Progressive Layer Dropping passes 1/p_i. With a KV ``cache``
    returns ``(x, new_cache)`` (see ``Attention``).
    """
    cfg = self.config
    attn = Attention(cfg, causal=self.causal, per_row_positions=self.per_row_positions,
                     name="attention")
    mlp = Mlp(cfg, name="mlp") if self.feed_forward is None else self.feed_forward(cfg)
    ln1 = LayerNorm(cfg.layernorm_eps, name="ln_attention")
    ln2 = LayerNorm(cfg.layernorm_eps, name="ln_mlp")

    def scaled(y: jax.Array) -> jax.Array:
      return y if branch_scale is None else y * branch_scale.astype(y.dtype)

    if cache is not None:  # decoding: pre-LN GPT only
      y, cache = attn(ln1(x), positions, mask, deterministic, cache)
      x = x + y
      return x + mlp(ln2(x), deterministic), cache
    if self.pre_ln:
      x = x + scaled(attn(ln1(x), positions, mask, deterministic))
      return x + scaled(mlp(ln2(x), deterministic))
    x = ln1(x + scaled(attn(x, positions, mask, deterministic)))
    return ln2(x + scaled(mlp(x, deterministic)))


def _to_device_memory(variables):
  return jax.device_put(variables, jax.memory.Space.Device)


# params -> params: what each block reads instead of the parameters it is given, while
# `fetching_block_params` is active (ZeRO-3's per-block gather in the per-device step).
BlockParamsFetch = Callable[[dict], dict]
_BLOCK_PARAMS_FETCH: contextvars.ContextVar[BlockParamsFetch | None] = contextvars.ContextVar(
    "block_params_fetch", default=None)


@contextlib.contextmanager
def fetching_block_params(fetch: BlockParamsFetch | None) -> Iterator[None]:
  """Each block traced inside reads its parameters through ``fetch``: inside the block's
  remat, so the backward pass fetches them again (None: no-op). Read while tracing, as
  ``intercept_dense`` is."""
  token = _BLOCK_PARAMS_FETCH.set(fetch)
  try:
    yield
  finally:
    _BLOCK_PARAMS_FETCH.reset(token)


def remat_block(cfg: ModelConfig, initializing: bool = False) -> type[Block]:
  """``Block`` wrapped per ``cfg.params_on_host``, ``fetching_block_params`` and ``cfg.remat``
  (activation checkpointing).

  With ``params_on_host`` (ZeRO-Infinity's parameter offload, Rajbhandari et
  al. 2021), the block's parameters live in host memory and the block copies
  them to device memory where it reads them; under remat the backward pass
  copies them again instead of keeping them on device, and their gradients
  go back to host memory (the copy's transpose). Pass the calling module's
  ``is_initializing()`` as ``initializing``: parameters are created in device
  memory, and the copy applies only to existing ones.

  ``full`` recomputes the whole layer in the backward pass;
  ``save_matmul_outputs`` keeps the outputs of weight matmuls (not the
  attention score einsums, which are batched) and recomputes the rest;
  ``offload`` keeps the same outputs in pinned host memory instead of device
  memory (activation offload, as ZeRO-Infinity's activation checkpoints on
  the CPU), to be copied back for the backward pass.
  """
  block = Block
  fetch = _BLOCK_PARAMS_FETCH.get()
  if cfg.params_on_host and not initializing:
    block = nn.map_variables(Block, "params", trans_in_fn=_to_device_memory)
  elif fetch is not None and not initializing:
    block = nn.map_variables(Block, "params",
                             trans_in_fn=lambda v: {**v, "params": fetch(v["params"])})
  policies = {"save_matmul_outputs": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
              "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
                  offload_src="device", offload_dst="pinned_host")}
  if cfg.remat == "none":
    return block
  if cfg.remat == "full":
    return nn.remat(block, static_argnums=(4,))
  if cfg.remat in policies:
    return nn.remat(block, static_argnums=(4,), policy=policies[cfg.remat])
  raise ValueError(f"model.remat={cfg.remat!r}; allowed: {', '.join(REMAT_POLICIES)}")


class Embed(nn.Module):
  """Token embedding table [vocab, d_model], split over ``tensor`` by vocabulary."""

  vocab_size: int
  d_model: int

  def setup(self):
    self.table = self.param("table", param_init(("vocab", "embed")),
                            (self.vocab_size, self.d_model))

  def __call__(self, ids: jax.Array, dtype) -> jax.Array:
    """ids: [B, S] int → [B, S, d_model]."""
    return constrain(jnp.take(self.table, ids, axis=0).astype(dtype), ("batch", "seq", "embed"))

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied LM head: [B, S, d_model] → logits [B, S, vocab] (vocab-parallel)."""
    logits = dense(x, self.table.astype(x.dtype).T, (*self.path, "table"))
    return constrain(logits, ("batch", "seq", "vocab"))
