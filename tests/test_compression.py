"""Quantizers, integer weights and matmuls, kernels, sparsity, QAT and integer models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeed.compression import (
  ema_range,
  int8_matmul,
  pack_int4,
  quantize,
  quantize_asymmetric,
  quantize_binary,
  quantize_static,
  quantize_symmetric,
  quantize_ternary,
  quantize_to_int,
  quantize_tokens_int8,
  quantize_tokenwise,
  quantize_weight,
  quantized_matmul,
  unpack_int4,
)
from jaxspeed.compression.export import load_integer_model, save_integer_model
from jaxspeed.compression.qat import (
  QuantGroup,
  assign_groups,
  compression_from_config,
  fake_quant_interceptor,
  matmul_shapes,
)
from jaxspeed.compression.sparsity import (
  admm_init,
  admm_penalty,
  admm_update,
  nm_mask,
  project_nm,
)
from jaxspeed.compression.zeroquant import quantize_model
from jaxspeed.config import default_config
from jaxspeed.errors import ConfigError
from jaxspeed.models import BertEncoder, ModelConfig
from jaxspeed.models.layers import intercept_dense
from pallas_kernels import quant_matmul as kernels

X = jnp.array([[-1.0, 0.5, 0.25, 2.0]])


def test_symmetric_hand_computed():
  # 3 bits: s = 2 * 2 / 8 = 0.5; x / s = [-2, 1, 0.5, 4] -> round-half-even [-2, 1, 0, 4],
  # clamped to [-4, 3] -> [-2, 1, 0, 3].
  np.testing.assert_allclose(quantize_symmetric(X, 3), [[-1.0, 0.5, 0.0, 1.5]])
  # Two groups, 8 bits: s = [1/128, 4/128]; 2.0 / s = 128 clamps to 127.
  np.testing.assert_allclose(quantize_symmetric(X, 8, groups=2),
                             [[-1.0, 0.5, 0.25, 127 / 64]])


def test_asymmetric_hand_computed():
  # 3 bits: s = 3 / 8 = 0.375, zero = round(-1 / 0.375) * s = -3 * 0.375 = -1.125,
  # codes = clip(round((x + 1.125) / s), 0, 7) = [0, 4, 4, 8 -> 7].
  np.testing.assert_allclose(quantize_asymmetric(X, 3), [[-1.125, 0.375, 0.375, 1.5]])


def test_ternary_and_binary_hand_computed():
  # mean|x| = 0.9375, threshold 0.65625 keeps -1 and 2, alpha = 1.5.
  np.testing.assert_allclose(quantize_ternary(X), [[-1.5, 0.0, 0.0, 1.5]])
  np.testing.assert_allclose(quantize_binary(X), [[-0.9375, 0.9375, 0.9375, 0.9375]])
  np.testing.assert_allclose(quantize(X, 1), quantize_binary(X))
  np.testing.assert_allclose(quantize(X, 2), quantize_ternary(X))


def test_tokenwise_quantization_has_one_range_per_token():
  x = jnp.array([[1.0, -0.5], [100.0, 30.0]])
  # 3 bits: row 0 s = 0.25 -> [1 -> 4 clamps to 3, -2]; row 1 s = 25 -> [4 -> 3, 1.2 -> 1].
  np.testing.assert_allclose(quantize_tokenwise(x, 3), [[0.75, -0.5], [75.0, 25.0]])


def test_weight_groups_are_output_channels():
  w = jnp.array([[1.0, 100.0], [-0.5, 50.0]])  # [d_in, d_out]
  q = quantize_weight(w, 3, groups=2)
  # Column 0 has its own range (s = 0.25), so it is not flushed by column 1's.
  np.testing.assert_allclose(q[:, 0], [0.75, -0.5])


def test_static_range_ema_and_clipped_ste():
  lo, hi = ema_range(None, jnp.array([-1.0, 1.0]))
  lo, hi = ema_range((lo, hi), jnp.array([-3.0, 3.0]), momentum=0.5)
  np.testing.assert_allclose([lo, hi], [-2.0, 2.0])
  x = jnp.array([-3.0, -0.3, 0.7, 2.5])
  grad = jax.grad(lambda x: jnp.sum(quantize_static(x, lo, hi, 8)))(x)
  np.testing.assert_array_equal(grad, [0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("fn", [
    lambda x: quantize_symmetric(x, 4, 2), lambda x: quantize_asymmetric(x, 4),
    quantize_ternary, quantize_binary, lambda x: quantize_tokenwise(x, 8)])
def test_ste_gradient_is_identity(fn):
  x = jnp.array([[0.3, -1.2, 0.7, 2.0], [0.1, 0.2, -0.4, 0.5]])
  g = jnp.arange(8.0).reshape(2, 4)
  np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(fn(x) * g))(x), g)


def test_int4_pack_round_trip():
  codes = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (16, 6)), jnp.int8)
  packed = pack_int4(codes)
  assert packed.dtype == jnp.uint8 and packed.shape == (8, 6)
  np.testing.assert_array_equal(unpack_int4(packed), codes)
  # Row 2i is the low nibble: -1 (0xF) low, 2 high -> 0x2F.
  assert int(pack_int4(jnp.array([[-1], [2]], jnp.int8))[0, 0]) == 0x2F


@pytest.mark.parametrize("bits,out_groups,group_size", [(8, 4, None), (4, 1, 16), (8, 1, 32)])
def test_integer_matmul_equals_dequantized_float_matmul(bits, out_groups, group_size):
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
  q = quantize_to_int(w, bits, out_groups=out_groups, group_size=group_size)
  if group_size is None:  # the integer weights are exactly the fake-quantized ones
    np.testing.assert_allclose(q.dequantize(), quantize_weight(w, bits, out_groups), atol=1e-6)
  xc, xs = quantize_tokens_int8(x.reshape(15, 64))
  y = quantized_matmul(x, q)
  expected = (xc.astype(jnp.float32) * xs[:, None]) @ q.dequantize()
  np.testing.assert_allclose(y.reshape(15, 32), expected, rtol=1e-5, atol=1e-4)
  # Against the float matmul, the error is bounded by the two quantization errors:
  # |x w - x' w'| <= |x - x'| |w| + |x'| |w - w'|, row by row.
  xf = x.reshape(15, 64)
  xd = xc * xs[:, None]
  bound = (jnp.abs(xf - xd) @ jnp.abs(w) + jnp.abs(xd) @ jnp.abs(w - q.dequantize()))
  assert np.all(np.abs(np.asarray(y.reshape(15, 32) - xf @ w)) <= bound + 1e-4)
  assert int8_matmul(xc, q.int8_codes()).dtype == jnp.int32


@pytest.mark.parametrize("m,k,n,group_size", [(32, 64, 48, None), (256, 32, 32, 16)])
def test_kernels_equal_references(m, k, n, group_size):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  xc, xs = quantize_tokens_int8(x)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  q8 = quantize_to_int(w, 8, group_size=group_size)
  np.testing.assert_allclose(kernels.w8a8_matmul(xc, xs, q8.codes, q8.scales, interpret=True),
                             kernels.w8a8_matmul_reference(xc, xs, q8.codes, q8.scales),
                             rtol=1e-5, atol=1e-4)
  q4 = quantize_to_int(w, 4, group_size=group_size)
  np.testing.assert_allclose(kernels.w4a8_matmul(xc, xs, q4.codes, q4.scales, interpret=True),
                             kernels.w4a8_matmul_reference(xc, xs, q4.codes, q4.scales),
                             rtol=1e-5, atol=1e-4)


def test_nm_mask_hand_computed():
  w = jnp.array([[0.1, -5.0], [-3.0, 1.0], [2.0, 0.5], [0.2, -0.1],
                 [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
  mask = nm_mask(w, 2, 4)
  np.testing.assert_array_equal(mask[:4, 0], [False, True, True, False])
  np.testing.assert_array_equal(mask[:4, 1], [True, True, False, False])
  np.testing.assert_array_equal(mask[4:, 0], [True, True, False, False])  # ties: earlier rows
  assert int(nm_mask(jnp.ones((12, 3)), 1, 3).sum()) == 12


def test_admm_finds_a_better_nm_solution_than_pruning_the_dense_one():
  # Least squares with correlated inputs: pruning the dense optimum is poor; ADMM
  # (NxMTransformer) steers the weights to an N:M pattern that fits.
  rng = np.random.default_rng(3)
  base = rng.normal(size=(256, 4))
  # Each input is one of 4 base features plus noise, 4 copies in a row: the dense
  # optimum spreads each feature's weight over its 4 copies, 2:4 keeps only 2 of them.
  x = jnp.asarray(np.repeat(base, 4, axis=1) + 0.3 * rng.normal(size=(256, 16)), jnp.float32)
  y = jnp.asarray(base @ rng.normal(size=(4, 4)), jnp.float32)
  loss = lambda w: jnp.mean(jnp.square(x @ w - y))
  w_dense = jnp.linalg.lstsq(x, y)[0]
  state, w = admm_init(w_dense, 2, 4), w_dense
  grad = jax.jit(jax.grad(lambda w, s: loss(w) + admm_penalty(w, s, 1.0)))
  for step in range(600):
    w = w - 0.05 * grad(w, state)
    if step % 20 == 19:
      state = admm_update(w, state, 2, 4)
  assert float(loss(project_nm(w, 2, 4))) < 0.5 * float(loss(project_nm(w_dense, 2, 4)))


def _tiny_bert():
  cfg = ModelConfig(vocab_size=64, num_layers=2, num_heads=2, d_model=32, d_ff=64,
                    max_seq_len=16, gelu_approximate=False)
  model = BertEncoder(cfg)
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 16)), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  params = jax.tree.map(lambda p: p.value if hasattr(p, "value") else p, params,
                        is_leaf=lambda p: hasattr(p, "value"))
  apply = lambda p, ids: model.apply({"params": p}, ids)
  return params, apply, ids


def test_integer_model_equals_fake_quantized_model_and_is_smaller(tmp_path):
  params, apply, ids = _tiny_bert()
  shapes = matmul_shapes(apply, params, ids)
  plan = assign_groups([QuantGroup(("attention",), 8, 8, 4), QuantGroup(("mlp",), 4, 8, 2)],
                       list(shapes))
  assert set(plan) == {f"layer_{i}/{m}" for i in range(2) for m in (
      "attention/query", "attention/key", "attention/value", "attention/out", "mlp/wi",
      "mlp/wo")}
  def fake_apply(p, ids):
    with intercept_dense(fake_quant_interceptor(plan)):
      return apply(p, ids)

  fake = jax.jit(fake_apply)(params, ids)
  model = quantize_model(params, plan, shapes)
  # The compiled program takes the integer codes, no float copy of the quantized weights,
  # and runs integer dots.
  run = jax.jit(lambda m, ids: m.apply(apply, ids)).lower(model, ids).compile()
  assert run.memory_analysis().argument_size_in_bytes == model.nbytes + ids.nbytes
  assert "s32[" in run.as_text() and "s8[" in run.as_text()
  real = run(model, ids)
  np.testing.assert_allclose(real, fake, atol=2e-4)
  assert float(jnp.max(jnp.abs(real - jax.jit(apply)(params, ids)))) > 1e-3  # quantized
  size = save_integer_model(tmp_path / "m.safetensors", model)
  loaded = load_integer_model(tmp_path / "m.safetensors")
  np.testing.assert_array_equal(run(loaded, ids), real)
  linear_float = sum(int(np.prod(s)) * 4 for _, s in model.shapes)
  linear_int = sum(w.nbytes for w in model.weights.values())
  assert linear_float / linear_int > 4.5  # mix of 4x (int8) and 8x (int4), minus scales
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  assert size < float_bytes - (linear_float - linear_int) + 8192  # + the JSON header


def test_compression_config_errors():
  params, apply, ids = _tiny_bert()
  shapes = matmul_shapes(apply, params, ids)
  c = default_config().compression
  assert compression_from_config(c, shapes) is None
  c.weight_quantization.enabled = True
  c.weight_quantization.modules = "attention/qery"
  with pytest.raises(ConfigError, match=r"weight_quantization\.modules.*matches no weight"):
    compression_from_config(c, shapes)
  c.weight_quantization.modules = "mlp"
  c.weight_quantization.quantize_groups = 7
  with pytest.raises(ConfigError, match="quantize_groups"):
    compression_from_config(c, shapes)
