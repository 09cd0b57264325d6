"""ZeRO++ (qwZ: int8 parameter all-gather, hpZ: node-local secondary copy, qgZ: int4
gradient reduce-scatter) and the explicit gradient reduce-scatter of ZeRO-2/3."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, compiled_step_text, train_losses
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxspeed
from jaxspeed.comm.hlo import collectives
from jaxspeed.parallel.zeropp import quantize_blocks, quantized_reduce_scatter, split_dim


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


def test_int4_reduce_scatter_sums_the_chunks_each_device_receives():
  """qgZ's all-to-all of int4 codes reduces as psum_scatter does, here exactly: every
  scale group holds a -8, so its scale is 1 and integers in [-8, 7] are their codes."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  x = np.random.default_rng(0).integers(-8, 8, size=(8, 16, 24)).astype(np.float32)
  x[:, 0, :] = x[:, :, 0] = -8
  x = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  def run(reduce_scatter):
    per_device = lambda v: reduce_scatter(v[0])[None]
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(("data", "fsdp")),
                                 out_specs=P(("data", "fsdp")), check_vma=False))(x)

  for dim, axes in ((0, ("data", "fsdp")), (1, ("data", "fsdp")), (0, ("data",))):
    exact = functools.partial(jax.lax.psum_scatter, axis_name=axes, scatter_dimension=dim,
                              tiled=True)
    int4 = functools.partial(quantized_reduce_scatter, dim=dim, axes=axes)
    np.testing.assert_array_equal(run(int4), run(exact))


def _configure(config, **zero):
  config.parallel.update(data=2, fsdp=2, tensor=2)
  config.zero.update(stage=3, **zero)
  config.model.num_layers = 1
  return config


@pytest.mark.parametrize("option,collective,codes", [
    ("quantized_weights", "all-gather", "s8["),  # qwZ: int8 weights
    ("quantized_gradients", "all-to-all", "u8["),  # qgZ: int4 gradients, two per byte
])
def test_quantized_collectives_train_like_exact_zero3(option, collective, codes, tiny_config):
  expected, _, _ = train_losses(_configure(tiny_config), 3)
  losses, setup, _ = train_losses(_configure(tiny_config, **{option: True}), 3)
  # Per-block scales (and Adam's normalization of the gradient's rounding): the loss moves
  # by far less than a step does.
  np.testing.assert_allclose(losses, expected, rtol=2e-3)
  assert losses != expected
  lines = [line for line in compiled_step_text(setup).splitlines()
           if f" {collective}(" in line]
  assert any(codes in line.split(f" {collective}(")[0] for line in lines)


def test_hpz_equals_zero3_and_gathers_inside_the_node(tiny_config):
  """hpZ reorders ZeRO-3's gather into two levels without changing a value, and every
  gather of the step but the secondary copy's stays inside a node (fsdp = 2 devices)."""
  expected, _, reference = train_losses(_configure(tiny_config), 3)
  losses, setup, state = train_losses(_configure(tiny_config, hpz_partition_size=2), 3)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  assert_trees_close(state.params, reference.params, rtol=1e-4, atol=1e-6)
  hlo = compiled_step_text(setup)
  # Devices 0-3 and 4-7 are the two nodes (data is the outermost mesh axis).
  gathers = [c for c in collectives(hlo, 8) if c.op == "all-gather" and not c.is_scalar]
  inside = [c for c in gathers if not c.crosses(4)]
  assert inside and sum(c.result_bytes for c in inside) > sum(
      c.result_bytes for c in gathers if c.crosses(4))


@pytest.mark.parametrize("overrides,message", [
    ({"stage": 1, "quantized_weights": True}, "needs zero.stage=3"),
    ({"stage": 3, "quantized_weights": True, "offload_params": "host"}, "offload_params"),
])
def test_qwz_needs_zero3_in_device_memory(overrides, message, tiny_config):
  tiny_config.zero.update(overrides)
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == "zero.quantized_weights" and message in str(info.value)


@pytest.mark.parametrize("overrides", [
    {"zero.stage": 2, "microbatches": 2},
    {"zero.stage": 3, "model.param_dtype": "bfloat16", "model.dtype": "bfloat16"},
], ids=["zero2_microbatches", "zero3_bfloat16"])
def test_reduce_scatter_equals_the_compilers_reduction(overrides, tiny_config):
  """The gradients reduced per device with psum_scatter train as XLA's reduction does
  (data=2 x fsdp=2 x tensor=2), and the program reduce-scatters."""
  tiny_config.parallel.update(data=2, fsdp=2, tensor=2)
  tiny_config.model.num_layers = 1
  tiny_config.update_from_flattened_dict(overrides)
  expected, _, reference = train_losses(tiny_config, 3)
  tiny_config.zero.reduce_scatter = True
  losses, setup, state = train_losses(tiny_config, 3)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  # In bfloat16, XLA sums the gradients in bfloat16 and the reduce-scatter in float32;
  # Adam's first steps move a weight by about the learning rate whatever its gradient's
  # size, so near-zero gradients summed in another precision move some weights apart.
  if tiny_config.model.param_dtype == "float32":
    assert_trees_close(state.params, reference.params, rtol=1e-4, atol=1e-6)
  hlo = compiled_step_text(setup)
  assert " reduce-scatter(" in hlo


def test_reduce_scatter_needs_zero2(tiny_config):
  tiny_config.zero.update(stage=1, reduce_scatter=True)
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == "zero.reduce_scatter" and "needs zero.stage >= 2" in str(info.value)


@pytest.mark.parametrize("overrides,key,message", [
    ({"zero.hpz_partition_size": 4}, "zero.hpz_partition_size", "allowed: 1, 2"),
    ({"zero.stage": 2, "zero.hpz_partition_size": 2}, "zero.hpz_partition_size",
     "needs zero.stage=3"),
    ({"zero.stage": 2, "zero.quantized_gradients": True}, "zero.quantized_gradients",
     "needs zero.stage=3"),
])
def test_zeropp_options_name_their_key(overrides, key, message, tiny_config):
  _configure(tiny_config).update_from_flattened_dict(overrides)
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == key and message in str(info.value)
