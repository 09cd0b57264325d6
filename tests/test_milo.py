"""MiLo (arXiv:2504.02658): bit-plane INT3 packing, compensators, rank rules, W3A16 kernel."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, subprocess_env

from jaxspeed.compression import milo
from jaxspeed.errors import ConfigError
from jaxspeed.moe.experts import ExpertWeights
from pallas_kernels.milo_matmul import (
    milo_matmul,
    milo_matmul_reference,
    pack_bitplanes,
    unpack_bitplanes,
)

F32 = milo.MiloConfig(group_size=32, compensator_dtype="float32")


def _experts(key, e=3, d=32, f=64) -> ExpertWeights:
  k = jax.random.split(key, 4)
  return ExpertWeights(0.1 * jax.random.normal(k[0], (e, d, f)),
                       0.1 * jax.random.normal(k[1], (e, f)),
                       0.1 * jax.random.normal(k[2], (e, f, d)),
                       0.1 * jax.random.normal(k[3], (e, d)))


def test_bitplanes_hand_case():
  # Row i holds i % 8: bit 0 alternates (0xA...), bit 1 in pairs (0xC...), bit 2 in fours.
  codes = (jnp.arange(32) % 8)[:, None]
  packed = pack_bitplanes(codes, 3)
  assert packed.shape == (3, 1, 1) and packed.dtype == jnp.uint32
  assert [int(p) for p in packed.ravel()] == [0xAAAAAAAA, 0xCCCCCCCC, 0xF0F0F0F0]
  np.testing.assert_array_equal(unpack_bitplanes(packed), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bitplanes_round_trip(bits):
  codes = jax.random.randint(jax.random.PRNGKey(bits), (96, 5), 0, 2**bits)
  packed = pack_bitplanes(codes, bits)
  assert packed.nbytes * 8 == bits * codes.size  # exactly b bits per code
  np.testing.assert_array_equal(unpack_bitplanes(packed), codes)


def test_bitplanes_need_rows_in_words_of_32():
  with pytest.raises(ValueError, match="divisible by 32"):
    pack_bitplanes(jnp.zeros((48, 2), jnp.int32), 3)


def test_quantize_groupwise_hand_case():
  # Column 0: -1 + 0.5·(i % 8): min -1, max 2.5, scale 0.5, codes i % 8, exact.
  # Column 1: range [0, 7] (scale 1); 0.4 -> 0, 0.6 -> 1, 3.49 -> 3, 3.51 -> 4.
  col0 = -1 + 0.5 * (np.arange(32) % 8)
  col1 = np.full(32, 1.0)
  col1[:6] = [0, 7, 0.4, 0.6, 3.49, 3.51]
  q = milo.quantize_groupwise(jnp.asarray(np.stack([col0, col1], 1), jnp.float32), 3, 32)
  np.testing.assert_array_equal(q.scales, [[0.5, 1.0]])
  np.testing.assert_array_equal(q.mins, [[-1.0, 0.0]])
  np.testing.assert_array_equal(q.codes()[:, 0], np.arange(32) % 8)
  np.testing.assert_array_equal(q.codes()[:6, 1], [0, 7, 0, 1, 3, 4])
  np.testing.assert_array_equal(q.dequantize()[:, 0], col0)
  assert [int(p) for p in q.packed[:, 0, 0]] == [0xAAAAAAAA, 0xCCCCCCCC, 0xF0F0F0F0]


def test_quantize_groupwise_error_within_half_a_step():
  w = jax.random.normal(jax.random.PRNGKey(0), (128, 16))
  q = milo.quantize_groupwise(w, 3, 64)
  step = np.repeat(np.asarray(q.scales, np.float32), 64, axis=0)
  err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
  assert np.all(err <= step / 2 + 1e-3)  # + float16 rounding of the range
  assert np.mean(err) > 0.01  # 3 bits of a unit Gaussian is lossy


def test_full_rank_compensator_reproduces_float_expert():
  w = _experts(jax.random.PRNGKey(1))
  x = jax.random.normal(jax.random.PRNGKey(2), (10, 32))
  full = milo.compress_experts(w, [32] * 3, [32] * 3, F32).dequantize()
  none = milo.compress_experts(w, [0] * 3, [0] * 3, F32).dequantize()
  for e in range(3):
    ref = milo.expert_mlp(x, jax.tree.map(lambda a, e=e: a[e], w))
    got = milo.expert_mlp(x, jax.tree.map(lambda a, e=e: a[e], full))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    int3 = milo.expert_mlp(x, jax.tree.map(lambda a, e=e: a[e], none))
    assert np.max(np.abs(int3 - ref)) > 1e-3


def test_error_falls_with_rank_and_rank_one_matrix_is_captured():
  # W = a·bᵀ: the error of deq(Q) + U·V falls with every added rank, is 0 at full rank,
  # and more rounds of MiLo's quantize / SVD loop do not raise it.
  a, b = jax.random.normal(jax.random.PRNGKey(3), (64,)), jax.random.normal(
      jax.random.PRNGKey(4), (32,))
  w = jnp.outer(a, b)
  errs = [float(jnp.linalg.norm(w - milo.compress(w, r, 32, F32).dequantize()))
          for r in (0, 1, 4, 32)]
  assert errs[0] > errs[1] > errs[2] > errs[3]
  assert errs[-1] < 1e-4
  rounds = [float(jnp.linalg.norm(
      w - milo.compress(w, 1, 1, milo.MiloConfig(group_size=32, iters=i,
                                                 compensator_dtype="float32")).dequantize()))
      for i in (1, 2, 3)]
  assert rounds[0] >= rounds[1] >= rounds[2]


def test_rank_padding_columns_are_zero_and_bytes_count_own_ranks():
  w = _experts(jax.random.PRNGKey(5))
  c = milo.compress_experts(w, [4, 0, 2], [1, 1, 1], F32)
  assert c.wi.u.shape == (3, 32, 4)
  assert np.all(np.asarray(c.wi.u)[1] == 0) and np.all(np.asarray(c.wi.u)[2][:, 2:] == 0)
  np.testing.assert_array_equal(c.wi.rank, [4, 0, 2])
  # 3 bits per weight, a float16 scale and min per group of 32, float32 U·V of its rank.
  codes = 3 * 32 * 64 * 3 // 8 + 2 * 2 * (3 * 64)
  assert c.wi.nbytes == codes + 6 * (32 + 64) * 4


def test_frequency_and_kurtosis_rules_hand_cases():
  np.testing.assert_array_equal(milo.frequency_ranks([3, 1], 32, 1024), [48, 16])
  np.testing.assert_array_equal(milo.kurtosis_ranks([0.4, 3, 9.6], 3, 4096), [0, 64, 1024])
  np.testing.assert_array_equal(milo.kurtosis_ranks([9.6], 3, 32), [32])  # capped
  assert abs(milo.kurtosis(jax.random.normal(jax.random.PRNGKey(0), (20000,)))) < 0.2


def test_allocator_respects_budget_and_favours_frequent_experts():
  # Same spectra, expert 0 used 3x as often: gains 12, 9, 6 beat expert 1's 4, 3, ...
  spectra = [[4, 3, 2, 1], [4, 3, 2, 1]]
  np.testing.assert_array_equal(milo.allocate_ranks([3, 1], spectra, [1, 1], 4), [3, 1])
  np.testing.assert_array_equal(milo.allocate_ranks([1, 1], spectra, [1, 1], 4), [2, 2])
  np.testing.assert_array_equal(milo.allocate_ranks([3, 1], spectra, [5, 5], 4), [0, 0])
  rng = np.random.default_rng(0)
  spectra = -np.sort(-rng.random((6, 16)), axis=1)
  costs = np.array([96, 96, 96, 160, 160, 160])
  ranks = milo.allocate_ranks(rng.random(6), spectra, costs, 2000)
  assert ranks @ costs <= 2000 and ranks @ costs > 2000 - 160


def test_bad_config_names_the_key():
  for kwargs, key in (({"bits": 5}, "milo.bits"), ({"mean_rank": -1}, "milo.mean_rank"),
                      ({"group_size": 48}, "milo.group_size"),
                      ({"allocation": "random"}, "milo.allocation")):
    with pytest.raises(ConfigError) as err:
      milo.MiloConfig(**kwargs)
    assert err.value.key == key
  w = _experts(jax.random.PRNGKey(6))
  with pytest.raises(ConfigError) as err:
    milo.compress_experts(w, [-1, 0, 0], [0, 0, 0], F32)
  assert err.value.key == "milo.ranks"
  with pytest.raises(ConfigError) as err:
    milo.compress_experts(w, [0, 0, 0], [0, 0, 0], milo.MiloConfig(group_size=64))
  assert err.value.key == "milo.group_size"  # 64 does not divide d = 32


@pytest.mark.parametrize("rank", [0, 3])
def test_pallas_kernel_equals_xla_reference(rank):
  k = jax.random.split(jax.random.PRNGKey(7), 3)
  w = jax.random.normal(k[0], (128, 48))
  c = milo.compress(w, rank, rank, milo.MiloConfig(group_size=64))
  x = jax.random.normal(k[1], (16, 128)).astype(jnp.bfloat16)
  lowrank = (c.u, c.v) if rank else ()
  ref = milo_matmul_reference(x, c.q.packed, c.q.scales, c.q.mins, *lowrank)
  got = milo_matmul(x, c.q.packed, c.q.scales, c.q.mins, *lowrank, interpret=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
  # The library path (the reference on CPU) is x·(deq(Q) + U·V).
  dense = x.astype(jnp.float32) @ c.dequantize()
  np.testing.assert_allclose(milo.milo_matmul(x, c), dense, rtol=1e-4, atol=1e-3)


def test_calibration_lowers_the_output_error_and_keeps_ranks():
  w = _experts(jax.random.PRNGKey(8))
  c = milo.compress_experts(w, [2, 0, 4], [2, 0, 4], F32)
  x = jax.random.normal(jax.random.PRNGKey(9), (3, 40, 32))
  mask = jnp.ones((3, 40)).at[0, 20:].set(0)
  tuned, losses = milo.calibrate(c, w, x, mask, steps=30, learning_rate=1e-3)
  assert losses[-1] < 0.9 * losses[0]
  assert np.all(np.asarray(tuned.wi.u)[1] == 0) and np.all(np.asarray(tuned.wo.v)[0][2:] == 0)
  np.testing.assert_array_equal(tuned.wi.q.packed, c.wi.q.packed)  # codes untouched


def _stats(w: ExpertWeights, counts) -> milo.LayerStats:
  tokens = jax.random.normal(jax.random.PRNGKey(10), (w.wi.shape[0], 8, w.wi.shape[1]))
  mask = (np.arange(8)[None] < np.minimum(counts, 8)[:, None]).astype(np.float32)
  return milo.LayerStats(tokens, mask, np.asarray(counts))


def test_choose_ranks_spends_the_budget_on_used_experts():
  experts = {"layer_0": _experts(jax.random.PRNGKey(11)), "layer_1": _experts(
      jax.random.PRNGKey(12))}
  stats = {"layer_0": _stats(experts["layer_0"], [50, 0, 10]),
           "layer_1": _stats(experts["layer_1"], [0, 60, 0])}
  cfg = milo.MiloConfig(group_size=32, mean_rank=3)
  uniform = milo.choose_ranks(dataclasses.replace(cfg, allocation="uniform"), experts, stats)
  assert all(np.all(r == 3) for pair in uniform.values() for r in pair)
  freq = milo.choose_ranks(dataclasses.replace(cfg, allocation="frequency"), experts, stats)
  np.testing.assert_array_equal(freq["layer_0"][0], [8, 0, 2])  # round(f/Σf · 3 · 3)
  energy = milo.choose_ranks(cfg, experts, stats)
  ranks = np.stack([np.stack(pair) for pair in energy.values()])  # [layer, wi/wo, E]
  assert ranks.sum() <= 3 * ranks.size and ranks.sum() > 3 * ranks.size - 2  # budget spent
  unused = np.array([[0, 1, 0], [1, 0, 1]], bool)  # experts no token was routed to
  assert np.all(ranks.transpose(0, 2, 1)[unused] == 0)


def test_experiment_rejects_bad_bits_before_training(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.milo", "--quick", "--bits=5",
       f"--output_dir={tmp_path}"], cwd=REPO, env=subprocess_env(), capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: config.milo.bits: got 5")
  assert not os.path.exists(tmp_path / "milo_run")
