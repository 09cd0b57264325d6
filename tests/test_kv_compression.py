"""KV-cache compression policies: exact at full budget, hand-checked selection, 2-bit, merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_inference import tiny_model

from jaxspeed.errors import ConfigError
from jaxspeed.inference import Generator, KVCache, cache_bytes
from jaxspeed.inference import quantize as q2
from jaxspeed.inference.builders import make_policy
from jaxspeed.inference.kv_policies import (
  PUNCT,
  SPECIAL,
  KvPolicyConfig,
  SlotPolicy,
  fastgen_head_policy,
  merge_evicted,
  slot_attention_weights,
)

CACHE_LEN = 24
FULL_BUDGET = {
    "local": {}, "h2o": {}, "kvmerger": {}, "fastgen": {"threshold": 1.0},
    "minikv": {"window": CACHE_LEN},  # nothing quantized: the window holds every token
}


def test_each_policy_at_full_budget_equals_full_cache():
  model, params = tiny_model("alibi", num_layers=1)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (2, CACHE_LEN), 0, 64))
  full = Generator(model, params, cache_len=CACHE_LEN).teacher_forced_logits(tokens, 9)
  for name, extra in FULL_BUDGET.items():
    policy = make_policy(KvPolicyConfig(policy=name, budget=1.0, punct_ids=(5,), **extra),
                         CACHE_LEN)
    logits = Generator(model, params, cache_len=CACHE_LEN, policy=policy).teacher_forced_logits(
        tokens, 9)
    np.testing.assert_allclose(logits, full, atol=1e-4, err_msg=name)
    assert (logits.argmax(-1) == full.argmax(-1)).all(), name


def test_compressed_cache_bytes_shrink_by_the_budget():
  model, params = tiny_model("rope")
  prompts = [list(range(1, 21))] * 2
  dense = Generator(model, params, cache_len=CACHE_LEN)
  full_bytes = cache_bytes(jax.eval_shape(lambda: dense.prefill(prompts)[0]))
  assert full_bytes == 2 * 2 * 2 * CACHE_LEN * 4 * 8 * 4  # layers, k+v, B, T, H, D, float32
  for name in ("h2o", "minikv"):
    policy = make_policy(KvPolicyConfig(policy=name, budget=0.5, window=4), CACHE_LEN)
    gen = Generator(model, params, cache_len=CACHE_LEN, policy=policy)
    caches = gen.prefill(prompts)[0]
    ratio = cache_bytes(caches) / full_bytes
    per_head = 2 * CACHE_LEN * 8 * 4  # bytes of the full cache per (layer, row, head)
    if name == "h2o":  # 12 slots of k, v plus 8 bytes of position and score
      assert ratio == pytest.approx(12 * (2 * 8 * 4 + 8) / per_head)
    else:
      # 8 quantized slots (2-bit k, v; float32 v scale, zero, position, score), per-channel
      # key scale and zero, and a 4-token float32 window with position and score.
      expected = 8 * (2 * 8 // 4 + 16) + 2 * 8 * 4 + 4 * (2 * 8 * 4 + 8)
      assert ratio == pytest.approx(expected / per_head)


def _prompt_cache(score, batch=1, heads=1, dim=4, seed=0):
  """A KVCache for a prompt of len(score) tokens with given accumulated attention."""
  n = len(score)
  k = jax.random.normal(jax.random.PRNGKey(seed), (batch, n, heads, dim))
  v = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, n, heads, dim))
  return KVCache(k, v, jnp.broadcast_to(jnp.asarray(score, jnp.float32), (batch, heads, n)))


def test_streaming_llm_and_h2o_keep_the_hand_computed_tokens():
  score = [5.0, 0.1, 0.2, 3.0, 0.3, 0.1, 2.0, 0.4, 0.2, 0.1]
  cache, tokens, lengths = _prompt_cache(score), jnp.zeros((1, 10), jnp.int32), jnp.array([10])
  local = SlotPolicy(KvPolicyConfig(policy="local", budget=0.5, sink_tokens=2), 5)
  kept = set(np.asarray(local.compress(cache, tokens, lengths).pos).ravel().tolist())
  assert kept == {0, 1, 7, 8, 9}  # 2 sinks + the 3 most recent
  h2o = SlotPolicy(KvPolicyConfig(policy="h2o", budget=0.5, recent_ratio=0.4), 5)
  kept = set(np.asarray(h2o.compress(cache, tokens, lengths).pos).ravel().tolist())
  assert kept == {0, 3, 6, 8, 9}  # recent 2 (8, 9) + 3 heaviest of the rest (0, 3, 6)


def test_fastgen_picks_the_cheapest_policy_reaching_the_threshold():
  # Head 0: the special token takes 90.5% of the attention; head 1: punctuation adds 6%;
  # head 2: spread evenly, so only the full cache recovers 95%.
  score = jnp.asarray([[[9.5, 0.1, 0.6, 0.1, 0.1, 0.1, 0.0, 0.0],
                        [8.0, 0.2, 0.6, 0.1, 0.1, 0.0, 0.0, 0.0],
                        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]])
  kind = jnp.asarray([[SPECIAL, 0, PUNCT, 0, 0, 0, 0, 0]], jnp.int8)[:, None].repeat(3, 1)
  pos = jnp.broadcast_to(jnp.arange(8), (1, 3, 8))
  cfg = KvPolicyConfig(policy="fastgen", threshold=0.9, fastgen_ratio=0.25)
  policy = fastgen_head_policy(score, kind, pos, jnp.array([8]), cfg)
  # Head 1: special 8/9 = 0.889 < 0.9, + punct 8.6/9 = 0.956. Head 2: special, punct,
  # 2 heavy, 2 local = 6/8 = 0.75 < 0.9 -> full.
  assert policy.tolist() == [[0, 1, 4]]


def test_two_bit_packing_round_trips():
  codes = jax.random.randint(jax.random.PRNGKey(0), (3, 5, 16), 0, 4).astype(jnp.uint8)
  packed = jax.jit(q2.pack)(codes)
  assert packed.shape == (3, 5, 4) and packed.dtype == jnp.uint8
  assert (jax.jit(q2.unpack)(packed) == codes).all()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 8))

  def error_and_scale(x, axis):
    scale, zero = q2.quant_params(x, axis=axis)
    return jnp.abs(q2.dequantize(q2.quantize(x, scale, zero), scale, zero, x.dtype) - x), scale

  for axis in (-1, 1):  # per token, per channel
    error, scale = jax.jit(error_and_scale, static_argnums=1)(x, axis)
    assert (error <= scale / 2 + 1e-6).all()


def test_merging_identical_keys_is_exact():
  # Tokens 1..3 share one key (values differ): merged into token 1, attention is unchanged.
  k = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 6, 8))
  k = k.at[:, :, 2].set(k[:, :, 1]).at[:, :, 3].set(k[:, :, 1])
  v = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 6, 8))
  pos = jnp.arange(6)[None, None]
  entries = dict(k=k, v=v, pos=pos, score=jnp.ones((1, 1, 6)), log_mass=jnp.zeros((1, 1, 6)))
  kept = jnp.asarray([[[True, True, False, False, True, True]]])
  cfg = KvPolicyConfig(policy="kvmerger", merge_threshold=0.99)
  merged = jax.jit(merge_evicted, static_argnums=2)(entries, kept, cfg)
  q = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 8))
  cur = jnp.array([6])

  def attend(e, keep):
    keep = np.asarray(keep)
    w = slot_attention_weights(q, e["k"][:, :, keep], e["pos"][:, :, keep], cur,
                               e["log_mass"][:, :, keep], None)
    return jnp.einsum("bhn,bhnd->bhd", w, e["v"][:, :, keep])

  kept_idx = np.flatnonzero(np.asarray(kept[0, 0]))
  attend = jax.jit(attend, static_argnums=1)
  np.testing.assert_allclose(attend(merged, tuple(kept_idx)), attend(entries, tuple(range(6))),
                             atol=1e-6)
  assert float(jnp.exp(merged["log_mass"][0, 0, 1])) == pytest.approx(3.0)


def test_bad_policy_settings():
  with pytest.raises(ConfigError, match=r"policy.*allowed values"):
    KvPolicyConfig(policy="random")
  for budget in (0.0, 1.01, -0.5):
    with pytest.raises(ConfigError, match=r"budget.*\(0, 1\]"):
      KvPolicyConfig(policy="h2o", budget=budget)
  with pytest.raises(ConfigError, match="window"):
    make_policy(KvPolicyConfig(policy="minikv", window=0), 16)
