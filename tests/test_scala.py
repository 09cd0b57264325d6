"""ScaLA's adversarial embedding noise (jaxspeed.training.adversarial)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import train_losses

import jaxspeed
from jaxspeed.training.adversarial import (
    EmbeddingNoise,
    ascent_step,
    embedding_noise,
    perturbed,
    project,
)
from jaxspeed.training.step import loss_sum_fn


def test_projection_scales_each_row_outside_the_ball_onto_it():
  delta = jnp.array([[[3.0, 4.0]], [[0.3, 0.4]]])  # row norms 5 and 0.5
  out = project(delta, 1.0)
  np.testing.assert_allclose(out, [[[0.6, 0.8]], [[0.3, 0.4]]], rtol=1e-6)


def test_one_ascent_step_of_a_linear_model_is_epsilon_along_the_gradient():
  """L = ½‖w·(x+δ) − y‖² per row: g = ∂L/∂x = w (w·x − y); one step from δ=0 with a step
  longer than ε gives δ = ε g/‖g‖ (row by row, whatever the gradient's scale)."""
  w = jnp.array([1.0, -2.0])
  x = jnp.array([[[1.0, 1.0]], [[2.0, 0.5]]])
  y = jnp.array([3.0, 0.0])

  def loss(delta):
    return 0.5 * jnp.sum(jnp.square(jnp.sum((x + delta) * w, axis=-1)[:, 0] - y))

  g = jax.grad(loss)(jnp.zeros_like(x))
  # by hand: row 0: w·x − y = −1 − 3 = −4, g = −4 w = (−4, 8); row 1: 1 − 0 = 1, g = (1, −2)
  np.testing.assert_allclose(g, [[[-4.0, 8.0]], [[1.0, -2.0]]])
  noise = EmbeddingNoise(epsilon=0.5, steps=1, step_size=2.0)
  delta = ascent_step(jnp.zeros_like(x), g, noise)
  unit = 1 / np.sqrt(5)
  np.testing.assert_allclose(delta, [[[-0.5 * unit, 1.0 * unit]], [[0.5 * unit, -1.0 * unit]]],
                             rtol=1e-6)
  assert loss(delta) > loss(jnp.zeros_like(x))
  # a short step stays inside the ball: δ = η g/‖g‖
  short = ascent_step(jnp.zeros_like(x), g, EmbeddingNoise(0.5, 1, 0.1))
  np.testing.assert_allclose(short, delta * 0.2, rtol=1e-6)


def test_the_outer_loss_is_taken_at_the_worst_embeddings_with_parameter_gradients(tiny_config):
  """The perturbed objective is larger than the clean one, grows with ε, and the parameter
  gradient differs from the clean gradient (it is taken at E(x) + δ)."""
  setup = jaxspeed.build(tiny_config)
  clean = loss_sum_fn(setup.model)
  with jax.set_mesh(setup.mesh):
    params = setup.init_state().params
    batch = setup.to_device(setup.train_data.next_batch())
  batch = jax.device_get(batch)
  objective = lambda fn, p: fn(p, batch, None, True)[0]
  base = float(objective(clean, params))
  small = float(objective(perturbed(clean, EmbeddingNoise(0.05, 1, 0.05)), params))
  large = float(objective(perturbed(clean, EmbeddingNoise(0.5, 2, 0.25)), params))
  assert base < small < large
  g_clean = jax.grad(lambda p: objective(clean, p))(params)
  g_adv = jax.grad(lambda p: objective(perturbed(clean, EmbeddingNoise(0.5, 2, 0.25)), p))(params)
  diff = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g_clean,
                                      g_adv))
  assert max(diff) > 1e-4


def test_epsilon_zero_trains_exactly_as_without_noise(tiny_config):
  tiny_config.model.num_layers = 1
  expected, _, _ = train_losses(tiny_config, 3)
  tiny_config.optim.adversarial.update(epsilon=0.0, steps=3, step_size=0.5)
  losses, _, _ = train_losses(tiny_config, 3)
  assert losses == expected
  tiny_config.optim.adversarial.epsilon = 0.1
  perturbed_losses, _, _ = train_losses(tiny_config, 3)
  assert perturbed_losses[0] > expected[0]  # the first step's loss is at E(x) + δ


@pytest.mark.parametrize("overrides,key,message", [
    ({"optim.adversarial.epsilon": -0.1}, "optim.adversarial.epsilon", ">= 0"),
    ({"optim.adversarial.steps": 0}, "optim.adversarial.steps", ">= 1"),
    ({"optim.adversarial.step_size": 0.0}, "optim.adversarial.step_size", "> 0"),
    ({"optim.adversarial.epsilon": 0.1, "parallel.stage": 2, "model.num_layers": 2},
     "optim.adversarial.epsilon", "the pipeline computes its loss inside the stages"),
])
def test_bad_adversarial_configs_name_their_key(overrides, key, message, tiny_config):
  tiny_config.update_from_flattened_dict(overrides)
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == key and message in str(info.value)


def test_embedding_noise_is_off_at_epsilon_zero():
  assert embedding_noise({"epsilon": 0.0, "steps": 4}) is None
  assert embedding_noise({"epsilon": 0.2, "steps": 2}) == EmbeddingNoise(0.2, 2, 1e-3)


@pytest.mark.parametrize("model_name", ["gpt", "bert"])
def test_data2_tensor2_equals_one_device(model_name, tiny_config):
  """Per-example balls: the split of rows over data and of d_model over tensor (with
  ZeRO-2's explicit per-device reduce-scatter for BERT, ZeRO-3 for GPT) trains as one
  device does."""
  tiny_config.model.update(name=model_name, num_layers=1, vocab_size=264)  # BERT adds [MASK]
  tiny_config.optim.adversarial.update(epsilon=0.2, steps=2, step_size=0.1)
  expected, _, _ = train_losses(tiny_config, 3, devices=jax.devices()[:1])
  tiny_config.parallel.update(data=2, tensor=2)
  if model_name == "gpt":
    tiny_config.zero.stage = 3
  else:
    tiny_config.zero.update(stage=2, reduce_scatter=True)
  losses, _, _ = train_losses(tiny_config, 3, devices=jax.devices()[:4])
  np.testing.assert_allclose(losses, expected, rtol=1e-4)


def test_microbatches_see_the_same_per_example_perturbation(tiny_config):
  """δ is per example, so accumulating two microbatches trains as one batch does."""
  tiny_config.model.num_layers = 1
  tiny_config.optim.adversarial.update(epsilon=0.2, steps=2, step_size=0.1)
  expected, _, _ = train_losses(tiny_config, 2, devices=jax.devices()[:1])
  tiny_config.microbatches = 2
  losses, _, _ = train_losses(tiny_config, 2, devices=jax.devices()[:1])
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
