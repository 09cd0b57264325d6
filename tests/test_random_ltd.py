"""Random-LTD: the kept-length schedule, token sampling, gather/scatter, and the models.

Each model test jits one function: on CPU one compile of a tiny model is much
cheaper than the hundreds of per-op compiles of eager execution.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxspeed.models import GPT, BertForMaskedLM, ModelConfig
from jaxspeed.models.attention import causal_mask
from jaxspeed.models.layers import Block
from jaxspeed.models.random_ltd import (
    gather_tokens,
    kept_length_at,
    layer_tokens,
    run_on_kept_tokens,
    sample_kept_indices,
    scatter_tokens,
)
from jaxspeed.training import cross_entropy

TINY = ModelConfig(vocab_size=64, num_layers=3, num_heads=4, d_model=32, d_ff=64,
                   max_seq_len=16)
RNGS = {"random_ltd": jax.random.PRNGKey(7)}
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 16), dtype=np.int32)


def _config(**changes) -> ModelConfig:
  return ModelConfig(**{**TINY.__dict__, **changes})


def numpy_params(module: nn.Module, *args, std: float = 0.02):
  """Parameters of ``module.init(key, *args)``'s shapes, drawn by numpy (nothing to compile).

  LayerNorm scales are near 1, everything else ~N(0, std²).
  """
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    noise = std * rng.standard_normal(leaf.shape)
    return (noise + (path[-1].key == "scale")).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes))


def test_kept_length_follows_the_fixed_linear_schedule():
  # r(t) = min + ⌊t·(max − min)/T⌋, rounded down to a multiple of 8.
  schedule = dict(min_value=16, max_value=128, require_steps=100, seq_per_step=8)
  assert kept_length_at(0, **schedule) == 16
  assert kept_length_at(33, **schedule) == 48  # 16 + 36 = 52 → 48
  assert kept_length_at(50, **schedule) == 72  # 16 + 56
  assert kept_length_at(99, **schedule) == 120  # 16 + 110 = 126 → 120
  assert kept_length_at(100, **schedule) == 128
  assert kept_length_at(10**6, **schedule) == 128
  # Bounds not multiples of 16: never below min (DeepSpeed: 16), reaches max (DeepSpeed: 96).
  odd = dict(min_value=20, max_value=100, require_steps=10, seq_per_step=16)
  assert kept_length_at(0, **odd) == 20
  assert kept_length_at(5, **odd) == 48  # 20 + 40 = 60 → 48
  assert kept_length_at(10, **odd) == 100


def test_layer_tokens_count_full_first_and_last_layers():
  assert layer_tokens(kept=64, seq_len=256, num_layers=24) == 2 * 256 + 22 * 64
  assert layer_tokens(kept=256, seq_len=256, num_layers=24) == 24 * 256
  assert layer_tokens(kept=8, seq_len=32, num_layers=2) == 2 * 32


def test_sampled_indices_are_sorted_unique_and_in_range():
  sample = jax.jit(sample_kept_indices, static_argnums=(1, 2, 3))
  idx = np.asarray(sample(jax.random.PRNGKey(0), 64, 32, 12))
  assert idx.shape == (64, 12) and idx.dtype == np.int32
  assert (np.diff(idx, axis=1) > 0).all()  # sorted and unique
  assert idx.min() >= 0 and idx.max() < 32
  assert len({tuple(row) for row in idx}) > 60
  # Every token about equally likely to be kept: 64·12/32 = 24 expected each.
  counts = np.bincount(idx.ravel(), minlength=32)
  assert counts.min() > 8 and counts.max() < 40


def test_gather_and_scatter_move_the_right_tokens():
  x = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)
  idx = jnp.array([[0, 2, 5], [1, 3, 4]])
  dropped = jnp.array([[1, 3, 4], [0, 2, 5]])

  @jax.jit
  def run(x):
    kept = gather_tokens(x, idx)
    out = scatter_tokens(x, -kept, idx)
    return kept, gather_tokens(jnp.arange(6)[None].repeat(2, 0), idx), out

  kept, positions, out = run(x)
  np.testing.assert_array_equal(kept[1], x[1, jnp.array([1, 3, 4])])
  np.testing.assert_array_equal(positions, idx)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(out), np.asarray(idx)[..., None],
                                                   1), -kept)
  np.testing.assert_array_equal(
      np.take_along_axis(np.asarray(out), np.asarray(dropped)[..., None], 1),
      np.take_along_axis(np.asarray(x), np.asarray(dropped)[..., None], 1))


def test_gather_and_scatter_gradients():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 7, 3)).astype(np.float32)
  kept = rng.standard_normal((2, 4, 3)).astype(np.float32)
  idx = jnp.array([[0, 2, 3, 6], [1, 2, 4, 5]], jnp.int32)
  check_grads(jax.jit(lambda a: gather_tokens(a, idx)), (x,), order=1, modes=["rev"])
  check_grads(jax.jit(lambda a, b: scatter_tokens(a, b, idx)), (x, kept), order=1,
              modes=["rev"])
  # A layer on the kept tokens: dropped tokens get the identity's gradient.
  grad = jax.jit(jax.grad(
      lambda a: run_on_kept_tokens(lambda h, _: 3 * h, a, a[..., 0], idx).sum()))(x)
  expected = np.ones_like(x)
  expected[np.arange(2)[:, None], np.asarray(idx)] = 3.0
  np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_kept_tokens_attend_at_their_original_positions(position):
  """Row b's kept tokens are the layer run on that row's subsequence at positions idx[b]."""
  cfg = _config(position=position)
  x = np.random.default_rng(1).standard_normal((2, 16, 32)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  idx = jnp.array([[0, 1, 4, 5, 6, 9, 13, 15], [2, 3, 4, 7, 8, 10, 11, 12]], jnp.int32)
  block = Block(cfg, causal=True, pre_ln=True)
  per_row = Block(cfg, causal=True, pre_ln=True, per_row_positions=True)
  # Large weights: sharp attention, so that positions visibly matter.
  params = {"params": numpy_params(block, x, positions, causal_mask(16), True, std=0.3)}

  @jax.jit
  def run(x):
    out = run_on_kept_tokens(lambda h, pos: per_row.apply(params, h, pos, causal_mask(8), True),
                             x, positions, idx)
    kept = gather_tokens(x, idx)

    def alone(b, row_positions):
      # Row b twice: both rows share positions, so even ALiBi's row-0 bias is right.
      pair = lambda a: jnp.stack([a[b], a[b]])
      return block.apply(params, pair(kept), pair(row_positions), causal_mask(8), True)[0]

    # Also at positions 0..7 instead of the original ones, which must differ.
    return out, [alone(b, idx) for b in range(2)], alone(0, positions[:, :8])

  out, rows, shifted = run(x)
  for b in range(2):
    np.testing.assert_allclose(out[b, idx[b]], rows[b], atol=1e-5)
    dropped = np.setdiff1d(np.arange(16), idx[b])
    np.testing.assert_array_equal(out[b, dropped], x[b, dropped])
  assert not np.allclose(shifted, out[0, idx[0]], atol=1e-4)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_gpt_random_ltd_loss(position):
  model = GPT(_config(position=position, num_layers=4))
  params = numpy_params(model, TOKENS)

  @jax.jit
  def run(params):
    apply = lambda kept, **kw: model.apply({"params": params}, TOKENS, random_ltd_kept=kept,
                                           rngs=RNGS, **kw)
    plain = model.apply({"params": params}, TOKENS)
    dropped, state = apply(8, mutable=["intermediates"])
    return (plain, apply(16), cross_entropy(plain, TOKENS)[0], cross_entropy(dropped, TOKENS)[0],
            state["intermediates"]["random_ltd_indices"])

  plain, full, plain_loss, dropped_loss, indices = run(params)
  np.testing.assert_array_equal(full, plain)
  assert np.isfinite(dropped_loss)
  assert float(dropped_loss) != pytest.approx(float(plain_loss), rel=1e-4)
  # Layers 1 and 2 of 4 drop tokens, each layer and row its own sorted subset.
  first, second = (np.asarray(i) for i in indices)
  assert first.shape == second.shape == (2, 8)
  for idx in (first, second):
    assert (np.diff(idx, axis=1) > 0).all() and idx.min() >= 0 and idx.max() < 16
    assert not np.array_equal(idx[0], idx[1])
  assert not np.array_equal(first, second)


def test_bert_random_ltd_keeps_padding_out():
  model = BertForMaskedLM(TINY)
  mask = jnp.arange(16)[None, :] < jnp.array([[10], [16]])
  params = numpy_params(model, TOKENS)

  @jax.jit
  def run(tokens):
    apply = lambda t, kept: model.apply({"params": params}, t, padding_mask=mask,
                                        random_ltd_kept=kept, rngs=RNGS)
    return apply(tokens, None), apply(tokens, 8), apply(tokens.at[0, 10:].set(1), 8)

  plain, dropped, padded = run(TOKENS)
  assert dropped.shape == (2, 16, 64)
  np.testing.assert_allclose(dropped[0, :10], padded[0, :10], atol=1e-5)
  assert not np.allclose(dropped, plain, atol=1e-3)
