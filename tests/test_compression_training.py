"""QAT from config on the trainer, and the distillation pieces of XTC."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import train_losses

import jaxspeed
from jaxspeed.compression.layer_distill import layer_reduction_init, soft_cross_entropy
from jaxspeed.config import validate
from jaxspeed.errors import ConfigError
from jaxspeed.training import make_eval_step


def _qat(config):
  wq = config.compression.weight_quantization
  wq.enabled, wq.target_bits, wq.quantize_groups = True, 4, 4
  aq = config.compression.activation_quantization
  aq.enabled, aq.schedule_offset, aq.modules = True, 2, "mlp"
  sp = config.compression.sparse_pruning
  sp.enabled, sp.modules = True, "mlp/wi"
  return config


def test_qat_trains_and_sharded_equals_single_device(tiny_config):
  config = _qat(tiny_config)
  single, setup, state = train_losses(config, 3, devices=jax.devices()[:1])
  assert single[-1] < single[0]
  # Evaluation runs the compressed model: the float model's loss differs.
  batch = setup.to_device(setup.val_data.batch_at(0))
  with jax.set_mesh(setup.mesh):
    compressed, _ = setup.eval_step(state.params, batch)
    plain, _ = make_eval_step(setup.model, setup.specs, setup.mesh)(state.params, batch)
  assert abs(float(compressed) - float(plain)) > 1e-5 * abs(float(plain))
  config.zero.stage, config.parallel.data, config.parallel.fsdp = 3, 2, 2
  config.parallel.tensor = 2
  sharded, _, _ = train_losses(config, 3)
  np.testing.assert_allclose(sharded, single, rtol=2e-4)


@pytest.mark.parametrize("key,value,match", [
    ("weight_quantization.target_bits", 9, "1..8"),
    ("activation_quantization.range_calibration", "static", "allowed values: dynamic"),
    ("weight_quantization.quantization_type", "nf4", "symmetric, asymmetric"),
    ("sparse_pruning.n", 4, "1 <= n < m"),
])
def test_bad_compression_config_is_rejected(tiny_config, key, value, match):
  section, name = key.split(".")
  tiny_config.compression[section][name] = value
  with pytest.raises(ConfigError, match=match):
    validate(tiny_config, 8)


def test_compression_pattern_matching_nothing_is_rejected_before_compiling(tiny_config):
  tiny_config.compression.weight_quantization.enabled = True
  tiny_config.compression.weight_quantization.modules = "atention"
  with pytest.raises(ConfigError, match=r"compression\.weight_quantization\.modules"):
    jaxspeed.build(tiny_config)


def test_soft_cross_entropy_hand_computed():
  # Uniform teacher over 4 classes, student logits log([0.1, 0.2, 0.3, 0.4]):
  # -1/4 · Σ log p = -(log .1 + log .2 + log .3 + log .4) / 4.
  s = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
  expected = -np.mean(np.log([0.1, 0.2, 0.3, 0.4]))
  np.testing.assert_allclose(soft_cross_entropy(s, jnp.zeros((1, 4))), expected, rtol=1e-6)


def test_layer_reduction_copies_chosen_teacher_layers():
  teacher = {"embed": {"table": 0}, "ln_final": {"scale": 1},
             **{f"layer_{i}": {"w": 10 + i} for i in range(6)}}
  student = layer_reduction_init(teacher, [1, 3, 5])
  assert student == {"embed": {"table": 0}, "ln_final": {"scale": 1},
                     "layer_0": {"w": 11}, "layer_1": {"w": 13}, "layer_2": {"w": 15}}
  bert = layer_reduction_init({"encoder": {"layer_0": 1, "layer_1": 2, "pos_embed": 3}}, [1])
  assert bert == {"encoder": {"layer_0": 2, "pos_embed": 3}}
  with pytest.raises(ValueError, match="teacher has no layer 6"):
    layer_reduction_init(teacher, [6])
