"""Evoformer attention equals the materialized reference, in values and all gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeed.models.evoformer_attention import (
    evoformer_attention,
    evoformer_attention_pallas,
    evoformer_attention_reference,
)

B, R, N, H, D = 1, 3, 37, 2, 8  # odd N: a partial last key block


def _inputs():
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q, k, v = (jax.random.normal(key, (B, R, N, H, D)) for key in keys[:3])
  pair = jax.random.normal(keys[3], (B, 1, H, N, N))
  keep = jax.random.bernoulli(keys[4], 0.8, (B, R, 1, 1, N)).at[..., 0].set(True)
  mask = 1e9 * (keep.astype(jnp.float32) - 1)  # DS4Sci's mask bias convention
  return q, k, v, pair, mask


def _grads(attend, *args, **biases):
  """Value and gradients w.r.t. q, k, v and every given bias of a weighted sum."""
  w = jax.random.normal(jax.random.PRNGKey(7), (B, R, N, H, D))
  names = sorted(biases)

  def loss(q, k, v, *bias_values):
    return jnp.sum(w * attend(q, k, v, **dict(zip(names, bias_values))))

  argnums = tuple(range(3 + len(names)))
  return jax.value_and_grad(loss, argnums)(*args, *(biases[n] for n in names))


@pytest.mark.parametrize("biases", [("pair", "mask"), ("pair",), ()])
@pytest.mark.parametrize("key_block", [16, 128])
def test_values_and_gradients_match_reference(biases, key_block):
  q, k, v, pair, mask = _inputs()
  given = {name: x for name, x in (("pair_bias", pair), ("mask_bias", mask))
           if name.split("_")[0] in biases}
  blocked = lambda *a, **kw: evoformer_attention(*a, key_block=key_block, **kw)
  np.testing.assert_allclose(blocked(q, k, v, **given),
                             evoformer_attention_reference(q, k, v, **given), atol=1e-5)
  got = _grads(blocked, q, k, v, **given)
  want = _grads(evoformer_attention_reference, q, k, v, **given)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("biases", [("pair", "mask"), ("mask",)])
def test_pallas_path_matches_reference(biases):
  """The flash kernels (Pallas interpreter), one row at a time: same values and gradients."""
  q, k, v, pair, mask = _inputs()
  given = {name: x for name, x in (("pair_bias", pair), ("mask_bias", mask))
           if name.split("_")[0] in biases}
  got = _grads(evoformer_attention_pallas, q, k, v, **given)
  want = _grads(evoformer_attention_reference, q, k, v, **given)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, r in zip(got[1], want[1]):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_pair_bias_gradient_sums_rows():
  """The pair-bias gradient is the sum of the per-row gradients (not one row's)."""
  q, k, v, pair, _ = _inputs()
  total = jax.grad(lambda p: evoformer_attention(q, k, v, pair_bias=p).sum())(pair)
  per_row = [jax.grad(lambda p, r=r: evoformer_attention(
      q[:, r:r + 1], k[:, r:r + 1], v[:, r:r + 1], pair_bias=p).sum())(pair) for r in range(R)]
  np.testing.assert_allclose(total, sum(per_row), atol=1e-5)
  assert not np.allclose(total, per_row[0], atol=1e-3)


def _gradient_temp_bytes(attend, rows: int, n: int) -> int:
  spec = jax.ShapeDtypeStruct((1, rows, n, H, D), jnp.float32)
  pair_spec = jax.ShapeDtypeStruct((1, 1, H, n, n), jnp.float32)
  loss = lambda q, k, v, p: attend(q, k, v, pair_bias=p).sum()
  compiled = jax.jit(jax.grad(loss, (0, 1, 2, 3))).lower(spec, spec, spec, pair_spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_gradient_memory_linear_in_n_per_row():
  """Doubling N doubles the gradient's temp memory (the reference's quadruples):
  no [B, R, H, N, N] logits are kept for the backward pass."""
  rows = 4
  blocked = [_gradient_temp_bytes(evoformer_attention, rows, n) for n in (256, 512)]
  naive = [_gradient_temp_bytes(evoformer_attention_reference, rows, n) for n in (256, 512)]
  assert blocked[1] / blocked[0] < 2.5
  assert naive[1] / naive[0] > 3.5
  assert blocked[1] < rows * H * 512 * 512 * 4 < naive[1]


def test_pallas_path_bias_buffers_do_not_grow_with_rows():
  """Per-row biases and bias gradients are never stacked over R: 4x the rows adds
  only the rows' own q, k, v-sized buffers, far below 3 more [B, H, N, N] floats."""
  n = 128
  two, eight = (_gradient_temp_bytes(evoformer_attention_pallas, rows, n) for rows in (2, 8))
  assert eight - two < 3 * H * n * n * 4


def test_bad_bias_shape_is_rejected():
  q, k, v, pair, _ = _inputs()
  with pytest.raises(ValueError, match="pair_bias"):
    evoformer_attention(q, k, v, pair_bias=pair[:, :, :1])


def test_evoformer_block_sharded_equals_one_device():
  """data=2 x tensor=2 (batch and heads/hidden split by the logical rules): the block's
  outputs and parameter gradients equal one device's."""
  import flax.linen as nn

  from jaxspeed.models.evoformer import EvoformerBlock
  from jaxspeed.parallel import compute_rules, make_mesh

  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  m = jax.random.normal(keys[0], (2, 3, 9, 16))  # [B, S, R, c_m]
  z = jax.random.normal(keys[1], (2, 9, 9, 8))  # [B, R, R, c_z]
  block = EvoformerBlock(heads=2, head_dim=4)
  variables = block.init(jax.random.PRNGKey(0), m, z)

  def loss(params, m, z):
    new_m, new_z = block.apply({"params": params}, m, z)
    return jnp.sum(jnp.sin(new_m)) + jnp.sum(jnp.cos(new_z))

  params = nn.meta.unbox(variables["params"])
  want = jax.jit(jax.value_and_grad(loss))(params, m, z)
  mesh = make_mesh(dict(data=2, fsdp=1, stage=1, expert=1, sequence=1, tensor=2),
                   jax.devices()[:4])
  with jax.set_mesh(mesh), nn.logical_axis_rules(compute_rules()):
    specs = nn.get_partition_spec(variables)["params"]
    shardings = nn.logical_to_mesh_sharding(specs, mesh, compute_rules())
    assert any("tensor" in str(s.spec) for s in jax.tree.leaves(shardings))
    sharded = jax.device_put(params, shardings)
    batch = jax.NamedSharding(mesh, jax.P("data"))
    got = jax.jit(jax.value_and_grad(loss))(sharded, jax.device_put(m, batch),
                                             jax.device_put(z, batch))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()) + 1e-7)
