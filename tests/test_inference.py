"""KV-cache generation: equal to recomputation, tensor parallel, sampling, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspeed
from jaxspeed.errors import ConfigError
from jaxspeed.inference import Generator, SamplingConfig, sample_logits
from jaxspeed.models import GPT, ModelConfig
from jaxspeed.parallel import make_mesh

CACHE_LEN = 40
# Prompt lengths 16 (= the bucket), 5 and 1 pad their rows differently.
PROMPTS = [list(range(3, 19)), [7, 8, 9, 10, 11], [42]]


def tiny_model(position: str, seed: int = 1, num_layers: int = 2, num_kv_heads: int = 0):
  """A random GPT whose weights are scaled up so that greedy outputs vary."""
  model = GPT(ModelConfig(vocab_size=64, num_layers=num_layers, num_heads=4, d_model=32, d_ff=64,
                          max_seq_len=CACHE_LEN, position=position, num_kv_heads=num_kv_heads))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32)))
  return model, jax.tree.map(lambda x: 3 * x, params["params"])


def recompute_greedy(model, params, prompt, steps):
  """Greedy decoding without a cache: the whole prefix is run again for each token."""
  logits_at = jax.jit(lambda buf, i: model.apply({"params": params}, buf)[0, i])
  buf = np.zeros((1, CACHE_LEN), np.int32)
  buf[0, : len(prompt)] = prompt
  out = []
  for i in range(len(prompt), len(prompt) + steps):
    nxt = int(jnp.argmax(logits_at(buf, i - 1)))
    out.append(nxt)
    if i < CACHE_LEN:
      buf[0, i] = nxt
  return out


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_cache_decode_equals_recomputation(position):
  model, params = tiny_model(position)
  generator = Generator(model, params, cache_len=CACHE_LEN)
  rows = generator.generate(PROMPTS, 12)
  for prompt, row in zip(PROMPTS, rows):
    assert row == recompute_greedy(model, params, prompt, 12)
  assert len({tuple(r) for r in rows}) > 1 and len(set(rows[0])) > 1  # not degenerate


def test_grouped_query_attention_caches_only_the_kv_heads():
  model, params = tiny_model("rope", num_kv_heads=2)
  generator = Generator(model, params, cache_len=CACHE_LEN)
  assert generator.prefill(PROMPTS)[0][0].k.shape == (3, CACHE_LEN, 2, 8)
  rows = generator.generate(PROMPTS[:2], 8)
  for prompt, row in zip(PROMPTS[:2], rows):
    assert row == recompute_greedy(model, params, prompt, 8)


def test_one_decode_program_and_cache_capacity():
  model, params = tiny_model("rope")
  generator = Generator(model, params, cache_len=CACHE_LEN)
  rows = generator.generate([list(range(1, 31))], 100)
  # 30 prompt tokens + 10 fed back fill the 40 slots; the 11th is generated from the last.
  assert len(rows[0]) == 11
  generator.generate([[1, 2, 3]], 5)
  assert generator._decode._cache_size() == 1


def test_tensor_parallel_generation_equals_single_device():
  model, params = tiny_model("alibi", seed=3)
  single = Generator(model, params, cache_len=CACHE_LEN)
  expected = single.generate(PROMPTS, 10)
  _, ref_logits, _ = single.prefill(PROMPTS)
  for tp in (2, 4):
    mesh = make_mesh({"tensor": tp}, jax.devices()[:tp])
    parallel = Generator(model, params, cache_len=CACHE_LEN, mesh=mesh)
    assert parallel.generate(PROMPTS, 10) == expected
    caches, logits, _ = parallel.prefill(PROMPTS)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=2e-5)
    assert caches[0].k.sharding.shard_shape(caches[0].k.shape)[2] == 4 // tp  # heads split
  wq = parallel.params["layer_0"]["attention"]["query"]
  assert wq.sharding.spec[1] == "tensor"  # heads split over the tensor axis


def test_rows_split_over_data_axes_generate_the_same_tokens():
  """The RLHF hybrid engine's placement: rows over data x fsdp, heads over tensor."""
  model, params = tiny_model("rope", seed=4)
  prompts = PROMPTS + [[5, 6], [9] * 7, [11, 12, 13]] + [[1]] * 2  # 8 rows
  sampling = SamplingConfig(temperature=1.0)
  expected = Generator(model, params, cache_len=CACHE_LEN).generate(prompts, 8,
                                                                    sampling=sampling)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  split = Generator(model, params, cache_len=CACHE_LEN, mesh=mesh, batch_axes=("data", "fsdp"))
  assert split.generate(prompts, 8, sampling=sampling) == expected
  caches, _, _ = split.prefill(prompts)
  assert caches[0].k.sharding.shard_shape(caches[0].k.shape)[:3] == (2, CACHE_LEN, 2)


def test_sampling_options():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]] * 256))
  keys = jax.random.split(jax.random.PRNGKey(0), 1)[0]
  greedy = sample_logits(logits, keys, SamplingConfig())
  assert (greedy == 1).all()
  assert (sample_logits(logits, keys, SamplingConfig(temperature=1.0, top_k=1)) == 1).all()
  top2 = sample_logits(logits, keys, SamplingConfig(temperature=1.0, top_k=2))
  assert set(np.asarray(top2).tolist()) == {1, 2}
  # Nucleus 0.75: tokens 1 (0.5) and 2 (0.3) reach it; 3 and 0 are cut.
  nucleus = sample_logits(logits, keys, SamplingConfig(temperature=1.0, top_p=0.75))
  assert set(np.asarray(nucleus).tolist()) == {1, 2}
  full = sample_logits(logits, keys, SamplingConfig(temperature=1.0))
  assert set(np.asarray(full).tolist()) == {0, 1, 2, 3}


def test_seed_stop_tokens_and_streaming():
  model, params = tiny_model("learned")
  generator = Generator(model, params, cache_len=CACHE_LEN)
  sampling = SamplingConfig(temperature=1.0, top_p=0.9)
  first = generator.generate(PROMPTS, 8, sampling=sampling, seed=5)
  assert generator.generate(PROMPTS, 8, sampling=sampling, seed=5) == first
  assert generator.generate(PROMPTS, 8, sampling=sampling, seed=6) != first
  greedy = generator.generate(PROMPTS, 8)
  stop = greedy[1][2]
  streamed = []
  rows = generator.generate(PROMPTS, 8, stop_tokens=[stop],
                            on_token=lambda step, toks, active: streamed.append(
                                (step, toks.copy(), active.copy())))
  assert rows[1] == greedy[1][: greedy[1].index(stop) + 1]  # ends with the stop token
  for r in (0, 2):
    cut = greedy[r].index(stop) + 1 if stop in greedy[r] else 8
    assert rows[r] == greedy[r][:cut]
  assert [s for s, _, _ in streamed] == list(range(len(streamed)))
  assert [int(t[1]) for _, t, a in streamed if a[1]] == rows[1]


def test_bad_input_errors():
  model, params = tiny_model("learned")
  generator = Generator(model, params, cache_len=CACHE_LEN)
  with pytest.raises(ConfigError, match=r"prompts.*empty"):
    generator.generate([[1, 2], []], 4)
  with pytest.raises(ConfigError, match="no prompts"):
    generator.generate([], 4)
  with pytest.raises(ConfigError, match="KV cache of 40"):
    generator.generate([list(range(40))], 4)
  with pytest.raises(ConfigError, match="cache_len"):
    Generator(model, params, cache_len=CACHE_LEN + 1)  # past the learned position table
  with pytest.raises(ConfigError, match="top_p"):
    SamplingConfig(temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("key,value,match", [
    ("kv_compression.policy", "lru", "allowed values: full, local"),
    ("kv_compression.budget", 0.0, r"\(0, 1\]"),
    ("kv_compression.budget", 1.5, r"\(0, 1\]"),
    ("tensor_parallel.tp_size", 3, "tp_size"),
    ("max_out_tokens", 4096, "max_out_tokens"),
])
def test_config_rejects_bad_inference_settings(tiny_config, key, value, match):
  section, _, name = key.rpartition(".")
  node = tiny_config.inference
  for part in filter(None, section.split(".")):
    node = node[part]
  node[name] = value
  with pytest.raises(ConfigError, match=match):
    jaxspeed.validate(tiny_config, 8)
