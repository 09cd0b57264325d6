"""MiniKV (Sharma et al. 2024): heavy-hitter selection over a 2-bit quantized KV cache.

The cache holds a full-precision ring of the ``window`` most recent tokens and
``capacity - window`` older heavy hitters (H2O's accumulated-attention ranking)
quantized to 2 bits: keys per channel (a scale and zero per channel and head,
fixed from the prompt; later keys are clipped to that range), values per token
(KIVI, Liu et al. 2024). A token leaving the window is quantized and competes
for a slot of the quantized store. Attention dequantizes the store on the fly.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from jaxspeed.errors import ConfigError
from jaxspeed.inference import quantize as q2
from jaxspeed.inference.kv_cache import KVCache
from jaxspeed.inference.kv_policies import (
  EMPTY,
  EVICTABLE,
  KvPolicyConfig,
  lowest,
  slot_attention_weights,
)
from jaxspeed.models.attention import repeat_kv_heads


@flax.struct.dataclass
class MiniKVCache:
  """kq, vq: uint8 [B, H, Cq, D/4] packed 2-bit codes; k_scale, k_zero: [B, H, 1, D];
  v_scale, v_zero: [B, H, Cq, 1]; pos, score: [B, H, Cq]; wk, wv: [B, H, W, D] the
  full-precision window (ring slot = position mod W); wpos, wscore: [B, H, W]."""

  kq: jax.Array
  k_scale: jax.Array
  k_zero: jax.Array
  vq: jax.Array
  v_scale: jax.Array
  v_zero: jax.Array
  pos: jax.Array
  score: jax.Array
  wk: jax.Array
  wv: jax.Array
  wpos: jax.Array
  wscore: jax.Array

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
             alibi_slopes: jax.Array | None) -> tuple[jax.Array, MiniKVCache]:
    """One decode step: q, k, v [B, 1, H, D], positions [B, 1] -> ([B, 1, H, D], new cache)."""
    if q.shape[1] != 1:
      raise ValueError("a compressed cache decodes one token per row at a time")
    cur = positions[:, 0]
    b, h, stored = self.pos.shape
    k, v = repeat_kv_heads(k, h), repeat_kv_heads(v, h)
    dtype = self.wk.dtype
    new_k, new_v = (jnp.swapaxes(x, 1, 2)[:, :, :1].astype(dtype) for x in (k, v))  # [B,H,1,D]
    keys = jnp.concatenate([q2.dequantize(self.kq, self.k_scale, self.k_zero, dtype), self.wk,
                            new_k], axis=2)
    values = jnp.concatenate([q2.dequantize(self.vq, self.v_scale, self.v_zero, dtype), self.wv,
                              new_v], axis=2)
    new_pos = jnp.broadcast_to(cur[:, None, None], (b, h, 1))
    pos = jnp.concatenate([self.pos, self.wpos, new_pos], axis=2)
    weights = slot_attention_weights(q[:, 0], keys, pos, cur, None, alibi_slopes)
    out = jnp.einsum("bhc,bhcd->bhd", weights.astype(values.dtype), values)
    score = jnp.concatenate([self.score, self.wscore, jnp.zeros((b, h, 1))], axis=2) + weights
    score_q, wscore, new_score = score[..., :stored], score[..., stored:-1], score[..., -1:]

    # The new token takes ring slot cur mod W; the token it displaces leaves the window.
    window = self.wpos.shape[-1]
    ring = (jnp.arange(window) == (cur % window)[:, None, None])  # [B, 1, W]
    pick = lambda x: jnp.sum(jnp.where(ring[..., None], x, 0), axis=2, keepdims=True)
    out_k, out_v = pick(self.wk), pick(self.wv)
    out_pos = jnp.max(jnp.where(ring, self.wpos, -1), axis=2, keepdims=True)
    out_score = pick(wscore[..., None])[..., 0]
    put = lambda old, new: jnp.where(ring.reshape(ring.shape + (1,) * (old.ndim - 3)), new, old)
    wk, wv = put(self.wk, new_k), put(self.wv, new_v)
    wpos, wscore = put(self.wpos, new_pos), put(wscore, new_score)

    # The displaced token competes (by accumulated attention) for a quantized slot.
    cand_pos = jnp.concatenate([self.pos, out_pos], axis=2)
    cand_score = jnp.concatenate([score_q, out_score], axis=2)
    tier = jnp.where(cand_pos < 0, EMPTY, EVICTABLE)
    evict = lowest(tier, cand_score)
    take = (jnp.arange(stored) == evict[..., None])  # [B, H, Cq]
    v_scale, v_zero = q2.quant_params(out_v, axis=-1)
    swap = lambda old, new: jnp.where(take.reshape(take.shape + (1,) * (old.ndim - 3)), new, old)
    new = self.replace(
        kq=swap(self.kq, q2.quantize(out_k, self.k_scale, self.k_zero)),
        vq=swap(self.vq, q2.quantize(out_v, v_scale, v_zero)),
        v_scale=swap(self.v_scale, v_scale), v_zero=swap(self.v_zero, v_zero),
        pos=swap(self.pos, out_pos), score=swap(score_q, out_score),
        wk=wk, wv=wv, wpos=wpos, wscore=wscore)
    return out[:, None].astype(q.dtype), new


@dataclasses.dataclass(frozen=True)
class MiniKVPolicy:
  """Compresses a prompt cache into a ``MiniKVCache`` of ``capacity`` tokens per head."""

  config: KvPolicyConfig
  capacity: int  # config.window >= 1: KvPolicyConfig checks it for minikv

  @property
  def window(self) -> int:
    return min(self.config.window, self.capacity)

  def compress(self, cache: KVCache, tokens: jax.Array, lengths: jax.Array) -> MiniKVCache:
    del tokens
    batch, prompt_len, _, head_dim = cache.k.shape
    heads = cache.score.shape[1]
    if head_dim % q2.PER_BYTE:
      raise ConfigError("model.d_model", f"minikv packs 4 codes per byte: the head dimension "
                        f"{head_dim} must be a multiple of 4")
    k, v = (jnp.swapaxes(repeat_kv_heads(x, heads), 1, 2) for x in (cache.k, cache.v))
    positions = jnp.arange(prompt_len)
    last = lengths[:, None, None]
    pos = jnp.broadcast_to(jnp.where(positions < last, positions, -1), (batch, heads, prompt_len))
    score = jnp.where(pos >= 0, cache.score, 0.0)
    window = self.window
    in_window = pos >= last - window
    # Ring slot r holds the window token whose position is r mod W.
    ring = (pos[..., None, :] % window == jnp.arange(window)[:, None]) & in_window[..., None, :]
    ring = ring & (pos[..., None, :] >= 0)  # [B, H, W, P]
    gather = lambda x: jnp.einsum("bhwp,bhpd->bhwd", ring.astype(x.dtype), x)
    wpos = jnp.max(jnp.where(ring, pos[..., None, :], -1), axis=-1)
    wscore = jnp.sum(jnp.where(ring, score[..., None, :], 0.0), axis=-1)

    stored = self.capacity - window
    older = (pos >= 0) & ~in_window
    tier = jnp.where(older, EVICTABLE, EMPTY)
    if prompt_len < stored:
      pad = [(0, 0), (0, 0), (0, stored - prompt_len)]
      k, v = (jnp.pad(x, [*pad, (0, 0)]) for x in (k, v))
      pos, score, tier = (jnp.pad(pos, pad, constant_values=-1), jnp.pad(score, pad),
                          jnp.pad(tier, pad, constant_values=EMPTY))
    order = jnp.lexsort((score, tier), axis=-1)[..., ::-1][..., :stored]
    take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 3)), 2)
    kept_tier = take(tier)
    kept_pos = jnp.where(kept_tier == EVICTABLE, take(pos), -1)
    kept_k, kept_v = take(k), take(v)
    valid_keys = (pos >= 0)[..., None]
    k_scale, k_zero = q2.quant_params(k, axis=2, valid=valid_keys)
    v_scale, v_zero = q2.quant_params(kept_v, axis=-1)
    return MiniKVCache(
        kq=q2.quantize(kept_k, k_scale, k_zero), k_scale=k_scale, k_zero=k_zero,
        vq=q2.quantize(kept_v, v_scale, v_zero), v_scale=v_scale, v_zero=v_zero,
        pos=kept_pos, score=jnp.where(kept_pos >= 0, take(score), 0.0),
        wk=gather(k[..., :prompt_len, :]) if prompt_len < stored else gather(k),
        wv=gather(v[..., :prompt_len, :]) if prompt_len < stored else gather(v),
        wpos=wpos, wscore=wscore)

  def before_decode(self, cache: MiniKVCache, tokens: jax.Array) -> MiniKVCache:
    del tokens
    return cache
