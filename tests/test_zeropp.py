"""ZeRO++'s qwZ: ZeRO-3's parameter all-gather in int8 with block scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import train_losses
from jax.sharding import PartitionSpec as P

import jaxspeed
from jaxspeed.parallel.zeropp import quantize_blocks, split_dim


def test_blocks_are_the_slices_of_the_split_dimension():
  x = jnp.array([[1.0, -2.0, 0.5], [0.1, 0.2, -0.4]])  # split along dim 0: one scale per row
  codes, scale = quantize_blocks(x, 0)
  assert codes.dtype == jnp.int8 and scale.shape == (2, 1)
  # DeepSpeed's symmetric scale 2·max|x| / 2^8; codes clipped to [-128, 127].
  np.testing.assert_allclose(scale[:, 0], [2 * 2.0 / 256, 2 * 0.4 / 256], rtol=1e-6)
  np.testing.assert_array_equal(codes, [[64, -128, 32], [32, 64, -128]])
  np.testing.assert_allclose(codes * scale, x, rtol=1e-6)


def test_the_split_dimension_is_the_one_zero_added_axes_to():
  assert split_dim(P(("data", "fsdp"), "tensor"), P(None, "tensor"), 2) == 0
  assert split_dim(P(None, "tensor"), P(None, "tensor"), 2) is None
  # An expert weight [E, d, f] keeps its expert axis: ``expert`` is a data axis for the
  # dense weights, but here it came from tensor parallelism, and the gather must keep it.
  assert split_dim(P("expert", ("data", "fsdp"), "tensor"), P("expert", None, "tensor"), 3) == 1


def _configure(config, quantized: bool):
  config.parallel.update(data=2, fsdp=2, tensor=2)
  config.zero.update(stage=3, quantized_weights=quantized)
  config.model.num_layers = 1
  return config


def test_quantized_gather_trains_like_the_exact_one_and_moves_int8(tiny_config):
  expected, _, _ = train_losses(_configure(tiny_config, False), 3)
  losses, setup, _ = train_losses(_configure(tiny_config, True), 3)
  # int8 weights with 256 levels per block: the loss moves by far less than a step does.
  np.testing.assert_allclose(losses, expected, rtol=2e-3)
  assert losses != expected
  with jax.set_mesh(setup.mesh):
    hlo = setup.train_step.lower(setup.abstract_state(), setup.to_device(
        setup.train_data.batch_at(0))).compile().as_text()
  gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
  assert any("= s8[" in line for line in gathers)


@pytest.mark.parametrize("overrides,message", [
    ({"stage": 1, "quantized_weights": True}, "needs zero.stage=3"),
    ({"stage": 3, "quantized_weights": True, "offload_params": "host"}, "offload_params"),
])
def test_qwz_needs_zero3_in_device_memory(overrides, message, tiny_config):
  tiny_config.zero.update(overrides)
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == "zero.quantized_weights" and message in str(info.value)
