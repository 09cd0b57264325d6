"""1-bit compression (Tang et al. 2021): bit packing, hand cases, Pallas kernels vs references."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.onebit import (
    BITS_PER_WORD,
    compress,
    compress_reference,
    decompress_average,
    decompress_average_reference,
    pack_signs,
    unpack_signs,
    use_pallas,
)


def _random(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(n).astype(np.float32)
  x[::7] = 0.0  # exact zeros must pack as +1
  error = (0.1 * rng.standard_normal(n)).astype(np.float32)
  return x, error


def test_pack_by_hand():
  x = jnp.array([1, -1, 0, -2, 3, -0.5, 0, 7], jnp.float32)
  # Elements 0, 2, 4, 6, 7 are >= 0: bits 1 + 4 + 16 + 64 + 128.
  packed = pack_signs(x)
  assert packed.dtype == jnp.uint8
  np.testing.assert_array_equal(packed, [0b11010101])
  np.testing.assert_array_equal(unpack_signs(packed), [1, -1, 1, -1, 1, -1, 1, 1])


def test_pack_unpack_round_trip_batched():
  x, _ = _random(3 * 64, seed=0)
  x = x.reshape(3, 64)
  packed = pack_signs(jnp.asarray(x))
  assert packed.shape == (3, 64 // BITS_PER_WORD)
  signs = unpack_signs(packed, dtype=jnp.bfloat16)
  assert signs.dtype == jnp.bfloat16
  np.testing.assert_array_equal(signs.astype(jnp.float32), np.where(x >= 0, 1.0, -1.0))
  np.testing.assert_array_equal(pack_signs(signs), packed)


def test_pack_rejects_ragged_length():
  with pytest.raises(ValueError, match="multiple of 8"):
    pack_signs(jnp.ones(12))


def test_compress_reference_by_hand():
  x = jnp.array([-3, 0, 2, 1, 2, 2, 0, 0], jnp.float32)
  error = jnp.array([-1, 0, 0, 1, 0, 0, 0, 0], jnp.float32)
  # y = [-4, 0, 2, 2, 2, 2, 0, 0]: ||y||^2 = 32, scale = sqrt(32 / 8) = 2; only bit 0 is clear.
  packed, scale, new_error = compress_reference(x, error)
  np.testing.assert_array_equal(packed, [0b11111110])
  assert scale.shape == () and float(scale) == 2.0
  np.testing.assert_array_equal(new_error, [-2, -2, 0, 0, 0, 0, -2, -2])


@pytest.mark.parametrize("n", [8, 64, 1000, 4096])
def test_compress_kernel_matches_reference(n):
  x, error = _random(n, seed=n)
  want = compress_reference(jnp.asarray(x), jnp.asarray(error))
  got = compress(jnp.asarray(x), jnp.asarray(error), interpret=True)
  assert [a.shape for a in got] == [(n // 8,), (), (n,)]
  assert [a.dtype for a in got] == [jnp.uint8, jnp.float32, jnp.float32]
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
  np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [compress_reference, lambda x, e: compress(x, e, interpret=True)])
def test_compress_all_zero(fn):
  zeros = jnp.zeros(64, jnp.float32)
  packed, scale, new_error = fn(zeros, zeros)
  np.testing.assert_array_equal(packed, np.full(8, 255, np.uint8))
  assert float(scale) == 0.0
  np.testing.assert_array_equal(new_error, np.zeros(64))


@pytest.mark.parametrize("fn", [compress_reference, lambda x, e: compress(x, e, interpret=True)])
def test_error_feedback_identity(fn):
  # Nothing is lost across steps: what is sent plus what is kept is the input.
  x, error = _random(1000, seed=1)
  packed, scale, new_error = fn(jnp.asarray(x), jnp.asarray(error))
  np.testing.assert_allclose(scale * unpack_signs(packed) + new_error, x + error,
                             rtol=1e-6, atol=1e-6)


def test_compress_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="equal 1-D shapes"):
    compress_reference(jnp.ones(8), jnp.ones(16))


def test_decompress_average_by_hand():
  packed = jnp.array([[0b00000001], [0b11111111]], jnp.uint8)
  scales = jnp.array([2.0, 4.0], jnp.float32)
  # Worker 0 sends [+2, -2 x 7], worker 1 sends [+4 x 8]; the mean is [3, 1 x 7].
  want = [3, 1, 1, 1, 1, 1, 1, 1]
  np.testing.assert_array_equal(decompress_average_reference(packed, scales), want)
  np.testing.assert_array_equal(decompress_average(packed, scales, interpret=True), want)


# m = 2048 runs a 2-step grid; m = 125 is not a multiple of the block and runs as one block.
@pytest.mark.parametrize(("p", "m"), [(1, 2048), (2, 2048), (4, 2048), (8, 2048), (3, 125)])
def test_decompress_average_kernel_matches_reference(p, m):
  rng = np.random.default_rng(p * m)
  packed = jnp.asarray(rng.integers(0, 256, (p, m), dtype=np.uint8))
  scales = jnp.asarray(rng.uniform(0.0, 2.0, p).astype(np.float32))
  got = decompress_average(packed, scales, interpret=True)
  assert got.shape == (8 * m,) and got.dtype == jnp.float32
  # Opposite signs cancel, so small outputs need an absolute tolerance too.
  np.testing.assert_allclose(got, decompress_average_reference(packed, scales),
                             rtol=1e-6, atol=1e-6)


def test_round_trip_through_workers():
  # Each worker compresses its own vector; the average of the sends is close to the mean input.
  xs = [_random(4096, seed=10 + j)[0] for j in range(4)]
  sent = [compress(jnp.asarray(x), jnp.zeros(4096), interpret=True) for x in xs]
  packed = jnp.stack([s[0] for s in sent])
  scales = jnp.stack([s[1] for s in sent])
  want = np.mean([s[1] * unpack_signs(s[0]) for s in sent], axis=0)
  np.testing.assert_allclose(decompress_average(packed, scales, interpret=True), want,
                             rtol=1e-6, atol=1e-7)


def test_use_pallas_off_gpu():
  assert use_pallas() is False
