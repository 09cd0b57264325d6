"""Models, position encodings, loss, schedules and the non-finite guard, by hand-checked cases."""

import importlib.util
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from helpers import assert_trees_close, train_losses

from jaxspeed import build
from jaxspeed.models import (
    GPT,
    BertForMaskedLM,
    ModelConfig,
    alibi_slopes,
    apply_rope,
    build_model,
)
from jaxspeed.parallel import make_mesh
from jaxspeed.training import cross_entropy, make_optimizer, make_schedule, state_specs

TINY = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=32, d_ff=64,
                   max_seq_len=16)


def _init(model, tokens):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 1, 8))

  def score(m, n):
    return float(jnp.sum(apply_rope(q, jnp.array([m])) * apply_rope(k, jnp.array([n]))))

  assert score(5, 3) == pytest.approx(score(12, 10), rel=1e-5)
  assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-6)
  assert score(5, 3) != pytest.approx(score(5, 4), rel=1e-3)


def test_alibi_slopes_match_bloom():
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
  # 6 heads: the 4-head geometric series, then odd powers of the 8-head series.
  np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_gpt_is_causal(position):
  model = GPT(ModelConfig(**{**TINY.__dict__, "position": position, "embed_layernorm": True}))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 64)
  params = _init(model, tokens)
  logits = model.apply({"params": params}, tokens)
  changed = model.apply({"params": params}, tokens.at[:, 10:].set(0))
  assert logits.shape == (2, 16, 64) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits[:, :10], changed[:, :10], atol=1e-5)
  assert not np.allclose(logits[:, 10:], changed[:, 10:], atol=1e-3)


def test_untied_embeddings_add_a_head():
  tokens = jnp.zeros((1, 4), jnp.int32)
  tied = _init(GPT(TINY), tokens)
  untied = _init(GPT(ModelConfig(**{**TINY.__dict__, "tie_embeddings": False})), tokens)
  assert "lm_head" in untied and "lm_head" not in tied
  count = sum(x.size for x in jax.tree.leaves(tied))
  assert count == TINY.num_params()


@pytest.mark.parametrize("remat", ["full", "save_matmul_outputs", "offload"])
def test_remat_policies_do_not_change_gradients(remat):
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 64)
  base, checkpointed = GPT(TINY), GPT(ModelConfig(**{**TINY.__dict__, "remat": remat}))
  params = _init(base, tokens)

  def grads(model):
    loss = lambda p: cross_entropy(model.apply({"params": p}, tokens), tokens)[0]
    return jax.grad(loss)(params)

  assert_trees_close(grads(checkpointed), grads(base), rtol=1e-5, atol=1e-6)


def test_offload_remat_sends_the_saved_matmul_outputs_to_the_host():
  """``offload`` saves what ``save_matmul_outputs`` saves, in pinned host memory: the
  program moves each saved output there in the forward pass. (XLA:CPU lowers these
  in-program transfers as no-ops, so the program is read before lowering.)"""
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 64)
  params = _init(GPT(TINY), tokens)

  def to_host(remat: str) -> int:
    model = GPT(ModelConfig(**{**TINY.__dict__, "remat": remat}))
    loss = lambda p: cross_entropy(model.apply({"params": p}, tokens), tokens)[0]
    return str(jax.make_jaxpr(jax.grad(loss))(params)).count("devices=(MemorySpace.Host,)")

  # Per layer: the q, k, v and output projections and the first MLP matmul; the second
  # one's output is only added to the residual stream, whose backward does not read it.
  assert to_host("offload") == 5 * TINY.num_layers
  assert to_host("save_matmul_outputs") == 0


def test_bfloat16_compute_keeps_float32_params():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 64)
  model = GPT(ModelConfig(**{**TINY.__dict__, "dtype": "bfloat16"}))
  params = _init(model, tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  full = GPT(TINY).apply({"params": params}, tokens)
  half = model.apply({"params": params}, tokens)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.1)


def test_bert_padding_does_not_leak():
  model = BertForMaskedLM(TINY)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 64)
  mask = jnp.arange(16)[None, :] < jnp.array([[10], [16]])
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, padding_mask=mask)["params"])
  out = model.apply({"params": params}, tokens, padding_mask=mask)
  out2 = model.apply({"params": params}, tokens.at[0, 10:].set(1), padding_mask=mask)
  assert out.shape == (2, 16, 64)
  np.testing.assert_allclose(out[0, :10], out2[0, :10], atol=1e-5)
  # bidirectional: the first token sees later (unpadded) tokens.
  out3 = model.apply({"params": params}, tokens.at[1, 15].set(3), padding_mask=mask)
  assert not np.allclose(out[1, 0], out3[1, 0], atol=1e-6)


def test_cross_entropy_matches_optax_and_masks():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
  targets = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 7)
  total, count = cross_entropy(logits, targets)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  assert float(total) == pytest.approx(float(expected.sum()), rel=1e-6)
  assert float(count) == 10
  mask = jnp.zeros((2, 5)).at[0, 0].set(1)
  total, count = cross_entropy(logits, targets, mask)
  assert float(total) == pytest.approx(float(expected[0, 0]), rel=1e-6) and float(count) == 1


def test_schedule_warmup_then_cosine(tiny_config):
  optim = tiny_config.optim
  optim.learning_rate, optim.warmup, optim.min_lr_ratio = 1.0, 4, 0.1
  lr = make_schedule(optim, total=14)
  assert float(lr(0)) == pytest.approx(0.25)
  assert float(lr(3)) == pytest.approx(1.0)
  assert float(lr(4)) == pytest.approx(1.0)
  # halfway through the 10-step decay: floor + (peak - floor) * (1 + cos(pi/2)) / 2
  assert float(lr(9)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert float(lr(14)) == pytest.approx(0.1)
  optim.schedule = "linear"
  assert float(make_schedule(optim, total=14)(9)) == pytest.approx(0.55)


def test_token_based_schedule_counts_tokens(tiny_config):
  tiny_config.optim.lr_unit = "tokens"
  tiny_config.optim.warmup = 16 * 32 * 4  # four steps of tokens
  losses, _, state = train_losses(tiny_config, 2, devices=jax.devices()[:1])
  assert int(state.tokens) == 2 * 16 * 32
  assert all(math.isfinite(x) for x in losses)


def test_non_finite_guard_skips_the_update(tiny_config):
  setup = build(tiny_config, devices=jax.devices()[:1])
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    bad = state.replace(params=jax.tree.map(lambda p: p.at[(0,) * p.ndim].set(jnp.inf)
                                            if p.ndim == 2 else p, state.params))
    expected = jax.tree.map(np.asarray, bad.params)
    after, _ = setup.train_step(bad, setup.to_device(setup.train_data.next_batch()))
    assert int(after.skipped) == 1 and int(after.step) == 1
    assert_trees_close(after.params, expected, rtol=0)
    good, _ = setup.train_step(setup.init_state(), setup.to_device(setup.train_data.next_batch()))
    assert int(good.skipped) == 0


def test_bert_trains_with_masked_lm(tiny_config):
  tiny_config.model.name = "bert"
  tiny_config.model.vocab_size = 264  # 256 bytes + [MASK], divisible by 8
  losses, setup, _ = train_losses(tiny_config, 10, devices=jax.devices()[:1])
  batch = setup.train_data.batch_at(0)
  selected = batch["loss_mask"] > 0
  assert 0.05 < selected.mean() < 0.3
  assert (batch["inputs"][~selected] == batch["targets"][~selected]).all()
  assert (batch["inputs"][selected] == 256).mean() > 0.6
  assert losses[-1] < losses[0]


def test_gpt3_xl_shapes_without_allocating():
  """GPT-3 1.3B: parameter count and ZeRO-3 per-device bytes, from abstract arrays only."""
  spec = importlib.util.spec_from_file_location("gpt3", f"{REPO}/configs/gpt3_1p3b.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  model_config = ModelConfig.from_config(config.model)
  model = build_model("gpt", model_config)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)))
  count = sum(x.size for x in jax.tree.leaves(shapes))
  assert count == model_config.num_params()
  assert 1.25e9 < count < 1.45e9
  mesh = make_mesh(config.parallel)
  specs = state_specs(model, make_optimizer(config.optim), tokens, mesh, zero_stage=3)
  per_device = sum(
      math.prod(jax.sharding.NamedSharding(mesh, s).shard_shape(x.shape)) * 4
      for s, x in zip(jax.tree.leaves(specs.state.params,
                                      is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)),
                      jax.tree.leaves(shapes["params"]), strict=True))
  assert per_device <= count * 4 / 8 * 1.05
