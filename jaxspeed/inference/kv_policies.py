"""KV-cache compression: keep (or merge) a budget of cached tokens per head while decoding.

After prefill, the full prompt cache is reduced to ``capacity`` slots per
(row, head); every decode step attends to the kept slots plus the new token,
then the new token takes the slot of the lowest-ranked entry. Policies differ
only in how they rank entries:

* ``local`` — StreamingLLM (Xiao et al. 2024): the first ``sink_tokens``
  tokens (attention sinks) and a sliding window of the most recent ones.
* ``h2o`` — H2O (Zhang et al. 2023): heavy hitters, the keys with the largest
  accumulated attention, plus a recent window (``recent_ratio`` of the budget).
* ``fastgen`` — FastGen (Ge et al. 2024): each head is profiled on the prompt
  and gets the cheapest of {special; +punctuation; +frequent (heavy hitters);
  +local window; full} whose kept keys recover at least ``threshold`` of its
  attention mass (Eq. 3 with the prompt's attention map summed over queries).
  Tokens a head's policy does not cover are never stored.
* ``kvmerger`` — KVMerger (Wang et al. 2024): H2O's selection, but a token
  leaving the cache is merged into its adjacent kept token when their keys
  have cosine similarity >= ``merge_threshold``, with Gaussian-kernel weight
  exp(-||k - k_p||² / 2σ²) relative to the pivot k_p. Each slot keeps the log
  of the mass merged into it as an attention-logit bias (proportional attention,
  as in ToMe, Bolya et al. 2023), so merging identical keys is exact.

``minikv`` (2-bit cache) lives in ``jaxspeed.inference.minikv``;
``jaxspeed.inference.builders.make_policy`` picks the policy of a config.
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp

from jaxspeed.errors import ConfigError
from jaxspeed.inference.kv_cache import NEG_INF, KVCache
from jaxspeed.models.attention import repeat_kv_heads
from jaxspeed.schema import Section, setting

POLICIES = ("full", "local", "h2o", "fastgen", "kvmerger", "minikv")

# Entries are evicted lowest tier first, then lowest value within a tier.
NOT_KEPT, EMPTY, EVICTABLE, PROTECTED = 0, 1, 2, 3
# Token kinds FastGen distinguishes.
OTHER, PUNCT, SPECIAL = 0, 1, 2
# FastGen's per-head policies, cheapest first.
FASTGEN_POLICIES = ("special", "special_punct", "special_punct_frequent",
                    "special_punct_frequent_local", "full")


@dataclasses.dataclass(frozen=True)
class KvPolicyConfig(Section):
  """A KV-compression policy and its knobs (``config.inference.kv_compression``).

  Attributes:
    policy: one of ``POLICIES``; ``full`` keeps every token.
    budget: kept tokens per head as a fraction of the cache length, in (0, 1].
    sink_tokens: StreamingLLM's always-kept first tokens.
    recent_ratio: share of the budget reserved for the most recent tokens (H2O, KVMerger).
    threshold: FastGen's attention-recovery target T, in (0, 1].
    fastgen_ratio: FastGen's heavy-hitter and local-window sizes r_f = r_l, as
      fractions of the prompt.
    merge_threshold: KVMerger's key cosine similarity needed to merge.
    merge_sigma: KVMerger's Gaussian kernel width, relative to the pivot key's norm.
    window: MiniKV's full-precision window of recent tokens, >= 1 for ``minikv``.
    special_ids: token ids FastGen treats as special (position 0 always is).
    punct_ids: token ids FastGen treats as punctuation.
  """

  KEY = "inference.kv_compression"

  policy: str = setting("full", choices=POLICIES)
  budget: float = setting(1.0, gt=0, le=1)
  sink_tokens: int = setting(4, ge=0)
  recent_ratio: float = setting(0.5, gt=0, le=1)
  threshold: float = setting(0.95, gt=0, le=1)
  fastgen_ratio: float = setting(0.3, gt=0, le=1)
  merge_threshold: float = setting(0.8, ge=-1, le=1)
  merge_sigma: float = setting(1.0, gt=0)
  window: int = setting(32, ge=0)
  special_ids: tuple[int, ...] = setting((), config=False)
  punct_ids: tuple[int, ...] = setting((), config=False)

  def check(self) -> None:
    if self.policy == "minikv" and self.window < 1:
      raise ConfigError("inference.kv_compression.window", "minikv needs a full-precision "
                        f"window of recent tokens: must be >= 1, got {self.window}")

  def capacity(self, cache_len: int) -> int:
    """Kept tokens per (row, head) for a cache of ``cache_len`` slots."""
    return max(1, math.ceil(self.budget * cache_len - 1e-9))


def token_kinds(tokens: jax.Array, positions: jax.Array, config: KvPolicyConfig) -> jax.Array:
  """int8 SPECIAL / PUNCT / OTHER per token; position 0 is special (the attention sink)."""
  special = (positions == 0) | jnp.isin(tokens, jnp.asarray(config.special_ids, jnp.int32))
  punct = jnp.isin(tokens, jnp.asarray(config.punct_ids, jnp.int32))
  return jnp.where(special, SPECIAL, jnp.where(punct, PUNCT, OTHER)).astype(jnp.int8)


def lowest(tier: jax.Array, value: jax.Array) -> jax.Array:
  """Index along the last axis of the lowest (tier, value) entry."""
  in_tier = tier == tier.min(axis=-1, keepdims=True)
  return jnp.argmin(jnp.where(in_tier, value, jnp.inf), axis=-1)


@flax.struct.dataclass
class SlotCache:
  """A compressed layer cache: ``capacity`` slots per (row, head).

  k, v: [B, H, C, D]; pos: [B, H, C] int32 token positions (-1 = empty);
  score: [B, H, C] accumulated attention; kind: [B, H, C] int8 (FastGen);
  log_mass: [B, H, C] float32 (KVMerger); head_policy: [B, H] int8
  (FastGen); incoming: [B] int8 kind of the token being decoded (FastGen).
  """

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  score: jax.Array
  kind: jax.Array | None
  log_mass: jax.Array | None
  head_policy: jax.Array | None
  incoming: jax.Array | None
  policy: SlotPolicy = flax.struct.field(pytree_node=False)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
             alibi_slopes: jax.Array | None) -> tuple[jax.Array, SlotCache]:
    """One decode step: q, k, v [B, 1, H, D], positions [B, 1] -> ([B, 1, H, D], new cache)."""
    if q.shape[1] != 1:
      raise ValueError("a compressed cache decodes one token per row at a time")
    cur = positions[:, 0]
    b, h = self.pos.shape[:2]
    k, v = repeat_kv_heads(k, h), repeat_kv_heads(v, h)
    entry = lambda old, new: jnp.concatenate([old, new[:, :, None]], axis=2)
    keys = entry(self.k, jnp.swapaxes(k, 1, 2)[:, :, 0].astype(self.k.dtype))
    values = entry(self.v, jnp.swapaxes(v, 1, 2)[:, :, 0].astype(self.v.dtype))
    pos = entry(self.pos, jnp.broadcast_to(cur[:, None], (b, h)))
    log_mass = None if self.log_mass is None else entry(self.log_mass, jnp.zeros((b, h)))
    weights = slot_attention_weights(q[:, 0], keys, pos, cur, log_mass, alibi_slopes)
    out = jnp.einsum("bhc,bhcd->bhd", weights.astype(values.dtype), values)
    score = entry(self.score, jnp.zeros((b, h))) + weights
    kind = None if self.kind is None else entry(
        self.kind, jnp.broadcast_to(self.incoming[:, None], (b, h)))
    tier, value = self.policy.rank(pos, score, kind, cur, self.head_policy)
    evict = lowest(tier, value)  # [B, H]; == C when the new token is not kept
    entries = dict(k=keys, v=values, pos=pos, score=score, kind=kind, log_mass=log_mass)
    if log_mass is not None:
      entries = merge_into_neighbor(entries, evict, self.policy.config)
    # The new token (entry C) takes the evicted slot; if it was itself evicted, nothing moves.
    slot = jnp.arange(self.pos.shape[-1])
    take_new = slot == evict[..., None]  # [B, H, C]

    def replace(x):
      if x is None:
        return None
      mask = take_new.reshape(take_new.shape + (1,) * (x.ndim - 3))
      return jnp.where(mask, x[:, :, -1:], x[:, :, :-1])

    new = {name: replace(x) for name, x in entries.items()}
    return out[:, None].astype(q.dtype), self.replace(**new)


def slot_attention_weights(q: jax.Array, keys: jax.Array, pos: jax.Array, cur: jax.Array,
                           log_mass: jax.Array | None, alibi_slopes: jax.Array | None
                           ) -> jax.Array:
  """softmax over kept slots: q [B, H, D], keys [B, H, N, D], pos [B, H, N] -> [B, H, N]."""
  logits = jnp.einsum("bhd,bhnd->bhn", q, keys).astype(jnp.float32) * q.shape[-1] ** -0.5
  if alibi_slopes is not None:
    logits -= alibi_slopes[:, None] * (cur[:, None, None] - pos).astype(jnp.float32)
  if log_mass is not None:
    logits += log_mass
  return jax.nn.softmax(jnp.where(pos >= 0, logits, NEG_INF), axis=-1)


@dataclasses.dataclass(frozen=True)
class SlotPolicy:
  """Ranks, compresses and decodes a ``SlotCache`` for one ``KvPolicyConfig``."""

  config: KvPolicyConfig
  capacity: int

  @property
  def recent(self) -> int:
    return max(1, round(self.config.recent_ratio * self.capacity))

  def rank(self, pos, score, kind, cur, head_policy):
    """(tier, value) [B, H, N] of each entry; the lowest is evicted first."""
    name = self.config.policy
    age = cur[:, None, None] - pos
    if name == "local":
      protected, evictable = pos < self.config.sink_tokens, jnp.ones_like(pos, bool)
      value = pos.astype(jnp.float32)
    elif name in ("h2o", "kvmerger"):
      protected, evictable = age < self.recent, jnp.ones_like(pos, bool)
      value = score
    else:  # fastgen
      p = head_policy[..., None]
      protected = ((kind == SPECIAL) | ((kind == PUNCT) & (p >= 1))
                   | ((age < self.recent) & (p >= 3)))
      evictable = p >= 2
      value = score
    # Protected entries overflowing the budget go oldest first.
    value = jnp.where(protected, pos.astype(jnp.float32), value)
    tier = jnp.where(protected, PROTECTED, jnp.where(evictable, EVICTABLE, NOT_KEPT))
    return jnp.where(pos < 0, EMPTY, tier), value

  def compress(self, cache: KVCache, tokens: jax.Array, lengths: jax.Array) -> SlotCache:
    """The prompt's full cache [B, P, H, D] -> ``capacity`` slots per head."""
    cfg = self.config
    batch, prompt_len = cache.k.shape[:2]
    heads = cache.score.shape[1]
    # Query heads rank keys differently, so each gets its own slots, also under GQA.
    k, v = (jnp.swapaxes(repeat_kv_heads(x, heads), 1, 2) for x in (cache.k, cache.v))
    positions = jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape)
    valid = positions < lengths[:, None]
    pos = jnp.broadcast_to(jnp.where(valid, positions, -1)[:, None], (batch, heads, prompt_len))
    score = jnp.where(pos >= 0, cache.score, 0.0)
    kind = head_policy = incoming = None
    if cfg.policy == "fastgen":
      kind = jnp.broadcast_to(token_kinds(tokens, positions, cfg)[:, None], pos.shape)
      head_policy = fastgen_head_policy(score, kind, pos, lengths, cfg)
      incoming = jnp.zeros((batch,), jnp.int8)
    tier, value = self.rank(pos, score, kind, lengths - 1, head_policy)
    entries = dict(k=k, v=v, pos=pos, score=score, kind=kind)
    if cfg.policy == "kvmerger":
      entries["log_mass"] = jnp.zeros(pos.shape, jnp.float32)
    # Pad to the capacity with empty entries, then keep the top ``capacity``.
    pad = max(0, self.capacity - prompt_len)
    if pad:
      widths = lambda x: [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3)
      entries = {n: None if x is None else jnp.pad(x, widths(x), constant_values=-1 * (n == "pos"))
                 for n, x in entries.items()}
      tier = jnp.pad(tier, widths(tier), constant_values=EMPTY)
      value = jnp.pad(value, widths(value))
    order = jnp.lexsort((value, tier), axis=-1)[..., ::-1][..., : self.capacity]  # [B, H, C]
    if cfg.policy == "kvmerger":
      kept = jnp.zeros(tier.shape, bool)
      kept = jax.vmap(jax.vmap(lambda m, i: m.at[i].set(True)))(kept, order)
      entries = merge_evicted(entries, kept & (entries["pos"] >= 0), cfg)
    gather = lambda x: None if x is None else jnp.take_along_axis(
        x, order.reshape(order.shape + (1,) * (x.ndim - 3)), axis=2)
    kept_entries = {n: gather(x) for n, x in entries.items()}
    kept_entries.setdefault("log_mass", None)
    # Tokens no policy keeps (FastGen) may fill a slot only as an empty one.
    kept_entries["pos"] = jnp.where(gather(tier) == NOT_KEPT, -1, kept_entries["pos"])
    return SlotCache(**kept_entries, head_policy=head_policy, incoming=incoming, policy=self)

  def before_decode(self, cache: SlotCache, tokens: jax.Array) -> SlotCache:
    """Tells FastGen's cache the kind of the token about to be decoded (position > 0)."""
    if cache.incoming is None:
      return cache
    return cache.replace(incoming=token_kinds(tokens, jnp.ones_like(tokens), self.config))


def fastgen_head_policy(score, kind, pos, lengths, cfg: KvPolicyConfig) -> jax.Array:
  """Per head, the cheapest FastGen policy recovering >= threshold of the attention: [B, H] int8.

  A policy keeps a set K of prompt keys; its recovery is Σ_{j∈K} A_·j / Σ_j A_·j
  with A_·j the attention key j received from all prompt queries (``score``).
  """
  valid = pos >= 0
  n = lengths[:, None, None].astype(jnp.float32)
  budget = jnp.ceil(cfg.fastgen_ratio * n)
  # Rank of each key by accumulated attention (0 = heaviest) among valid keys.
  ranks = jnp.argsort(jnp.argsort(-jnp.where(valid, score, -1.0), axis=-1), axis=-1)
  special = kind == SPECIAL
  with_punct = special | (kind == PUNCT)
  with_frequent = with_punct | (ranks < budget)
  with_local = with_frequent | (pos >= n - budget)
  sets = jnp.stack([special, with_punct, with_frequent, with_local, valid]) & valid
  total = score.sum(-1)
  recovered = (sets * score).sum(-1) >= cfg.threshold * total  # [5, B, H]
  recovered = recovered.at[-1].set(True)
  return jnp.argmax(recovered, axis=0).astype(jnp.int8)


def gaussian_weight(k: jax.Array, pivot: jax.Array, sigma: float) -> jax.Array:
  """KVMerger's kernel exp(-||k - k_p||² / 2σ²), σ relative to ||k_p||: [..., D] -> [...]."""
  k, pivot = k.astype(jnp.float32), pivot.astype(jnp.float32)
  width = sigma**2 * jnp.maximum(jnp.sum(pivot**2, -1), 1e-12)
  return jnp.exp(-jnp.sum((k - pivot) ** 2, -1) / (2 * width))


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
  return jnp.sum(a * b, -1) / jnp.maximum(norm, 1e-12)


def _merge_targets(keys, pos, src_keys, src_pos, candidates, threshold):
  """For source entries (keys [B, H, M, D], positions [B, H, M]), the adjacent candidate.

  The adjacent candidates are the kept entries right before and right after a
  source by position; it merges into the more similar one.

  Returns:
    (target [B, H, M] entry index, similar [B, H, M] bool: cosine >= threshold).
  """
  big = jnp.iinfo(jnp.int32).max
  before = candidates[..., None, :] & (pos[..., None, :] < src_pos[..., :, None])  # [B, H, M, N]
  after = candidates[..., None, :] & (pos[..., None, :] > src_pos[..., :, None])
  prev = jnp.argmax(jnp.where(before, pos[..., None, :], -1), -1)
  nxt = jnp.argmin(jnp.where(after, pos[..., None, :], big), -1)
  take = lambda i: jnp.take_along_axis(keys, i[..., None], axis=2)
  sim_prev = jnp.where(before.any(-1), cosine(src_keys, take(prev)), -jnp.inf)
  sim_next = jnp.where(after.any(-1), cosine(src_keys, take(nxt)), -jnp.inf)
  target = jnp.where(sim_prev >= sim_next, prev, nxt)
  return target, jnp.maximum(sim_prev, sim_next) >= threshold


def _merge(entries, target, merge, cfg: KvPolicyConfig):
  """Adds each merged source into its target with Gaussian-kernel weight; sources keep theirs."""
  k, v, log_mass = entries["k"], entries["v"], entries["log_mass"]
  pivot = jnp.take_along_axis(k, target[..., None], axis=2)
  weight = jnp.where(merge, gaussian_weight(k, pivot, cfg.merge_sigma) * jnp.exp(log_mass), 0.0)
  add = jax.vmap(jax.vmap(lambda z, i, x: z.at[i].add(x)))
  f32 = lambda x: x.astype(jnp.float32)
  mass = jnp.exp(log_mass)
  new_mass = add(mass, target, weight)
  merged_k = add(f32(k) * mass[..., None], target, f32(k) * weight[..., None])
  merged_v = add(f32(v) * mass[..., None], target, f32(v) * weight[..., None])
  out = dict(entries)
  out["k"] = (merged_k / new_mass[..., None]).astype(k.dtype)
  out["v"] = (merged_v / new_mass[..., None]).astype(v.dtype)
  out["log_mass"] = jnp.log(new_mass)
  out["score"] = add(entries["score"], target, jnp.where(merge, entries["score"], 0.0))
  return out


def merge_evicted(entries, kept, cfg: KvPolicyConfig):
  """Prefill: every evicted prompt token merges into an adjacent kept one if similar enough."""
  k, pos = entries["k"], entries["pos"]
  target, similar = _merge_targets(k, pos, k, pos, kept, cfg.merge_threshold)
  return _merge(entries, target, similar & (pos >= 0) & ~kept, cfg)


def merge_into_neighbor(entries, evict, cfg: KvPolicyConfig):
  """Decode: the one evicted entry per (row, head) merges into an adjacent entry if similar."""
  k, pos = entries["k"], entries["pos"]
  is_evicted = jnp.arange(pos.shape[-1]) == evict[..., None]
  src_k = jnp.take_along_axis(k, evict[..., None, None], axis=2)
  src_pos = jnp.take_along_axis(pos, evict[..., None], axis=2)
  target, similar = _merge_targets(k, pos, src_k, src_pos, (pos >= 0) & ~is_evicted,
                                   cfg.merge_threshold)
  merge = is_evicted & (pos >= 0) & similar
  return _merge(entries, jnp.where(is_evicted, target, 0), merge, cfg)
