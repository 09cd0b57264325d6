"""Progressive Layer Dropping: the schedules, the per-layer draw, and the models."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_random_ltd import TINY, TOKENS, numpy_params

from jaxspeed.models import GPT, BertForMaskedLM, ModelConfig
from jaxspeed.models.attention import causal_mask
from jaxspeed.models.layer_drop import (
    draw_layer_keeps,
    keep_probability,
    pld_theta,
    run_or_skip,
)
from jaxspeed.models.layers import Block
from jaxspeed.parallel import make_mesh
from jaxspeed.parallel.mesh import DATA_AXES
from jaxspeed.parallel.rules import compute_rules
from jaxspeed.training import cross_entropy

RNGS = {"layer_drop": jax.random.PRNGKey(3), "random_ltd": jax.random.PRNGKey(4)}


def test_theta_schedule_and_keep_probability():
  assert pld_theta(0, theta_bar=0.5, gamma=0.001) == 1.0
  assert pld_theta(1000, 0.5, 0.001) == pytest.approx(0.5 * math.exp(-1) + 0.5)
  assert pld_theta(10**6, 0.5, 0.001) == pytest.approx(0.5)
  traced = jax.jit(lambda t: pld_theta(t, 0.5, 0.001))(jnp.int32(1000))
  assert traced.dtype == jnp.float32 and float(traced) == pytest.approx(0.6839397, rel=1e-6)
  assert keep_probability(1, 12, 0.5) == pytest.approx(1 - 0.5 / 12)
  assert keep_probability(12, 12, 0.5) == pytest.approx(0.5)
  assert keep_probability(6, 12, 1.0) == 1.0
  np.testing.assert_allclose(keep_probability(np.arange(1, 5), 4, 0.2), [0.8, 0.6, 0.4, 0.2])


def test_layers_are_kept_at_their_probability():
  n, layers = 2000, 4
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  draw = jax.jit(jax.vmap(lambda k: draw_layer_keeps(k, layers, jnp.float32(0.5))))
  keeps, probs = draw(keys)
  expected = np.array([1 - i * 0.5 / layers for i in range(1, layers + 1)])
  np.testing.assert_allclose(probs[0], expected, rtol=1e-6)
  rate = np.asarray(keeps).mean(axis=0)
  np.testing.assert_array_less(np.abs(rate - expected), 3 * np.sqrt(expected * (1 - expected) / n))


@pytest.mark.parametrize("pre_ln", [True, False])
def test_kept_layer_at_theta_one_is_the_plain_layer_bit_for_bit(pre_ln):
  block = Block(TINY, causal=True, pre_ln=pre_ln)
  x = np.random.default_rng(1).standard_normal((2, 16, 32)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  params = {"params": numpy_params(block, x, positions, causal_mask(16), True)}
  call = lambda layer, h, scale: layer(h, positions, causal_mask(16), True, scale)

  class Dropped(nn.Module):
    @nn.compact
    def __call__(self, h, keep, prob):
      return run_or_skip(Block(TINY, causal=True, pre_ln=pre_ln, name="layer"), call, h, keep,
                         prob)

  @jax.jit
  def run(h, one, half):
    dropped = lambda keep, prob: Dropped().apply({"params": {"layer": params["params"]}}, h,
                                                 keep, prob)
    plain = block.apply(params, h, positions, causal_mask(16), True)
    return plain, dropped(True, one), dropped(False, one), dropped(True, half)

  plain, kept, skipped, rescaled = run(x, jnp.float32(1.0), jnp.float32(0.5))
  np.testing.assert_array_equal(kept, plain)
  np.testing.assert_array_equal(skipped, x)
  assert not np.allclose(rescaled, plain, atol=1e-3)


@pytest.mark.parametrize("model_cls", [GPT, BertForMaskedLM])
def test_theta_one_matches_the_plain_model(model_cls):
  """Compiled, XLA fuses across each layer's lax.cond differently: equal to a few ulp."""
  model = model_cls(TINY)
  params = numpy_params(model, TOKENS)
  @jax.jit
  def run(params, one, small):
    dropped = lambda theta: model.apply({"params": params}, TOKENS, layer_keep_theta=theta,
                                        rngs=RNGS)
    return model.apply({"params": params}, TOKENS), dropped(one), dropped(small)

  plain, kept, dropped = run(params, jnp.float32(1.0), jnp.float32(0.1))
  np.testing.assert_allclose(kept, plain, atol=1e-6, rtol=0)
  assert not np.allclose(dropped, plain, atol=1e-3)


class KeptLayersByHand(GPT):
  """GPT running only the layers ``kept``, layer i's residual branches scaled by 1/p_i at θ̄."""

  kept: tuple[int, ...] = ()
  theta: float = 0.5

  def layer_stack(self, x, positions, deterministic, random_ltd_kept, layer_keep_theta):
    cfg = self.config
    for i in self.kept:
      scale = jnp.float32(1 / keep_probability(i + 1, cfg.num_layers, self.theta))
      x = Block(cfg, causal=True, pre_ln=True, name=f"layer_{i}")(
          x, positions, causal_mask(x.shape[1]), deterministic, scale)
    return x


def _loss(model, params, **kwargs):
  return cross_entropy(model.apply({"params": params}, TOKENS, **kwargs), TOKENS)[0]


def test_a_drawn_keep_mask_runs_exactly_the_kept_layers():
  """Loss and gradients under the drawn mask [keep, skip, keep] are those of layers 0 and 2 run
  by hand with 1/p_i; the skipped layer gets a zero gradient."""
  model = GPT(TINY)
  params = numpy_params(model, TOKENS)
  theta = jnp.float32(0.5)
  keeps_under = jax.jit(lambda key: model.apply(
      {"params": params}, TOKENS, layer_keep_theta=theta, rngs={"layer_drop": key},
      mutable="intermediates")[1]["intermediates"]["layer_keeps"][0])
  key = next(k for k in map(jax.random.PRNGKey, range(100))
             if list(keeps_under(k)) == [True, False, True])
  pld = jax.jit(jax.value_and_grad(lambda p: _loss(model, p, layer_keep_theta=theta,
                                                   rngs={"layer_drop": key})))(params)
  by_hand = jax.jit(jax.value_and_grad(lambda p: _loss(KeptLayersByHand(TINY, kept=(0, 2)),
                                                       p)))(params)
  np.testing.assert_allclose(pld[0], by_hand[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), pld[1],
               by_hand[1])
  assert not any(np.any(g) for g in jax.tree.leaves(pld[1]["layer_1"]))
  assert all(np.any(g) for g in jax.tree.leaves(pld[1]["layer_2"]))


def test_a_skipped_layer_computes_nothing_and_under_remat_saves_only_its_input():
  """Each layer is one cond forward and one backward whose skipping branch holds no matmul.
  Without remat the conds return the layers' activations for the backward pass (zeros when
  skipped); under remat="full" only each layer's input, as the plain remat model."""
  model, remat = GPT(TINY), GPT(ModelConfig(**{**TINY.__dict__, "remat": "full"}))
  params = numpy_params(model, TOKENS)
  pld = lambda m: lambda p: _loss(m, p, layer_keep_theta=jnp.float32(0.5), rngs=RNGS)
  for m in (model, remat):
    conds = [e for e in jax.make_jaxpr(jax.grad(pld(m)))(params).eqns
             if e.primitive.name == "cond"]
    assert len(conds) == 2 * TINY.num_layers
    for cond in conds:
      skip, run = (str(branch.jaxpr).count("dot_general") for branch in cond.params["branches"])
      assert skip == 0 < run
  assert "cond" not in str(jax.make_jaxpr(lambda p: _loss(model, p))(params))

  residuals = lambda f: sum(x.size for x in jax.tree.leaves(jax.vjp(f, params)[1]))
  inputs = TINY.num_layers * TOKENS.size * TINY.d_model
  assert residuals(pld(remat)) <= residuals(lambda p: _loss(remat, p)) + inputs
  assert residuals(pld(model)) > 2 * residuals(pld(remat))  # the activations


def test_dropped_layers_get_no_gradient_with_remat_and_random_ltd():
  """θ = 0 keeps the last layer with p = 0; remat and Random-LTD compose with the cond."""
  model = GPT(ModelConfig(**{**TINY.__dict__, "remat": "full"}))
  params = numpy_params(model, TOKENS)

  @jax.jit
  def grads(params, theta):
    def loss(p):
      logits = model.apply({"params": p}, TOKENS, random_ltd_kept=8, layer_keep_theta=theta,
                           rngs=RNGS)
      return cross_entropy(logits, TOKENS)[0]
    return jax.grad(loss)(params)

  for theta in (0.0, 1.0):
    g = grads(params, jnp.float32(theta))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
    last_used = [(x != 0).any() for x in jax.tree.leaves(g["layer_2"])]
    assert not any(last_used) if theta == 0.0 else all(last_used)
  # θ = 1 keeps every layer; layer_1 (Random-LTD) gets gradient through its kept tokens.
  assert all((x != 0).any() for x in jax.tree.leaves(g["layer_1"]))


def test_data_parallel_workers_agree_on_the_draws():
  """Over 8 data-parallel devices the result equals one device's: one draw, replicated."""
  model = GPT(TINY)
  tokens = np.tile(TOKENS, (4, 1))
  params = numpy_params(model, tokens)
  apply = lambda p, t: model.apply({"params": p}, t, random_ltd_kept=8,
                                   layer_keep_theta=jnp.float32(0.5), rngs=RNGS)
  single = jax.jit(apply)(params, tokens)
  mesh = make_mesh({"data": 8})
  with jax.set_mesh(mesh), nn.logical_axis_rules(compute_rules()):
    sharded = jax.jit(apply)(params, jax.device_put(tokens, NamedSharding(mesh, P(DATA_AXES))))
  np.testing.assert_allclose(sharded, single, atol=1e-5)
