"""Tests for jaxspeed.data_efficiency: the offline data analyzer and the curriculum sampler."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from jaxspeed.data import TokenWindows
from jaxspeed.data_efficiency import (
    AnalysisIndex,
    CurriculumSampler,
    CurriculumSchedule,
    MetricCurriculum,
    analyze,
)
from jaxspeed.errors import ConfigError

# Four samples of 4 tokens, 0 is padding. Non-pad counts: 1 -> 6, 2 -> 6, 3 -> 1 (13 tokens).
TINY = np.array([[1, 1, 1, 1],
                 [1, 2, 0, 0],
                 [3, 2, 1, 0],
                 [2, 2, 2, 2]], np.int32)


def first_token(sample: np.ndarray) -> float:
  """Module level, so worker processes can unpickle it."""
  return float(sample[0])


def even_first_token(sample: np.ndarray) -> float:
  return 2.0 * float(sample[0])


def test_metrics_by_hand(tmp_path):
  index = analyze(TINY, ["seqlen", "vocab_rarity"], tmp_path, pad_id=0)
  a, b = -math.log(6 / 13), -math.log(1 / 13)
  np.testing.assert_array_equal(index.values("seqlen"), [4, 2, 3, 4])
  np.testing.assert_allclose(index.values("vocab_rarity"), [4 * a, 2 * a, b + 2 * a, 4 * a])
  np.testing.assert_array_equal(index.index_to_sample("seqlen"), [1, 2, 0, 3])  # stable ties
  np.testing.assert_array_equal(index.index_to_sample("vocab_rarity"), [1, 0, 3, 2])
  np.testing.assert_allclose(index.index_to_metric("vocab_rarity"),
                             [2 * a, 4 * a, 4 * a, b + 2 * a])


def test_without_pad_counts_every_token(tmp_path):
  # Counts 0 -> 3, 1 -> 6, 2 -> 6, 3 -> 1 over 16 tokens.
  index = analyze(TINY, {"len": "seqlen", "rarity": "vocab_rarity"}, tmp_path)
  nlp = {t: -math.log(c / 16) for t, c in {0: 3, 1: 6, 2: 6, 3: 1}.items()}
  np.testing.assert_array_equal(index.values("len"), [4, 4, 4, 4])
  np.testing.assert_allclose(index.values("rarity"),
                             [sum(nlp[int(t)] for t in row) for row in TINY])


def test_files_are_memmaps(tmp_path):
  analyze(TINY, {"seqlen": "seqlen", "first": first_token}, tmp_path, pad_id=0)
  for metric in ("seqlen", "first"):
    for kind in ("sample_to_metric", "index_to_sample", "index_to_metric"):
      assert os.path.exists(tmp_path / f"{metric}_{kind}.npy")
  index = AnalysisIndex.load(tmp_path)
  assert index.num_samples == 4 and index.metrics == ("seqlen", "first")
  assert isinstance(index.values("first"), np.memmap)
  assert index.values("first").dtype == np.float64
  assert isinstance(index.index_to_sample("first"), np.memmap)
  assert index.index_to_sample("first").dtype == np.int64
  np.testing.assert_array_equal(index.values("first"), [1, 1, 3, 2])
  np.testing.assert_array_equal(index.samples_up_to("first", 2), [0, 1, 3])
  np.testing.assert_array_equal(index.samples_up_to("seqlen", 3.5), [1, 2])
  np.testing.assert_array_equal(index.samples_in_percentile("seqlen", 0, 50), [1, 2])
  np.testing.assert_array_equal(index.samples_in_percentile("seqlen", 50, 100), [0, 3])
  with pytest.raises(KeyError):
    index.values("nope")


def test_percentiles(tmp_path):
  values = np.random.default_rng(0).integers(0, 1000, size=(37, 1))
  index = analyze(values, {"first": first_token}, tmp_path)
  expected = np.percentile(values[:, 0].astype(np.float64), np.arange(101))
  meta = json.loads((tmp_path / "analysis.json").read_text())
  assert meta["num_samples"] == 37 and meta["metrics"] == ["first"]
  np.testing.assert_allclose(meta["percentiles"]["first"], expected)
  for q in (0, 25, 50, 90, 100):
    assert index.percentile_value("first", q) == pytest.approx(expected[q])
  np.testing.assert_array_equal(index.index_to_metric("first"), np.sort(values[:, 0]))


def test_token_windows_and_ragged_samples(tmp_path):
  windows = TokenWindows(np.arange(30) % 7, seq_len=4)  # 6 windows of 5 tokens
  index = analyze(windows, ["seqlen"], tmp_path / "w")
  np.testing.assert_array_equal(index.values("seqlen"), [5] * 6)
  ragged = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6])]
  index = analyze(ragged, ["seqlen"], tmp_path / "r")
  np.testing.assert_array_equal(index.index_to_sample("seqlen"), [1, 2, 0])


def test_two_workers_match_one(tmp_path):
  rng = np.random.default_rng(1)
  samples = rng.integers(0, 40, size=(53, 9))
  samples[rng.random(samples.shape) < 0.2] = 0
  metrics = {"seqlen": "seqlen", "vocab_rarity": "vocab_rarity", "first": first_token}
  analyze(samples, metrics, tmp_path / "one", num_workers=1, pad_id=0)
  analyze(samples, metrics, tmp_path / "two", num_workers=2, pad_id=0)
  names = sorted(os.listdir(tmp_path / "one"))
  assert names == sorted(os.listdir(tmp_path / "two")) and len(names) == 10
  for name in names:
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_unpicklable_metric_with_workers(tmp_path):
  with pytest.raises(ValueError, match="module level"):
    analyze(TINY, {"m": lambda s: 0.0}, tmp_path, num_workers=2)


# ----- sampler -----

N = 300


@pytest.fixture(scope="module")
def index(tmp_path_factory):
  samples = np.random.default_rng(2).integers(0, 50, size=(N, 8))
  return analyze(samples, {"first": first_token, "even": even_first_token,
                           "vocab_rarity": "vocab_rarity"}, tmp_path_factory.mktemp("index"))


def two_metric_sampler(index, seed=0, batch=16):
  metrics = {
      "first": MetricCurriculum(CurriculumSchedule(
          "fixed_linear", 10, 50, total_curriculum_step=20, difficulty_step=5), "value"),
      "vocab_rarity": MetricCurriculum(CurriculumSchedule(
          "fixed_root", 10, 100, total_curriculum_step=30, difficulty_step=10, root_degree=2),
          "percentile"),
  }
  return CurriculumSampler(index, metrics, batch, seed)


def eligible(index, difficulties):
  """Independent check: samples with first <= d1 and rarity rank in the lowest d2 percent."""
  by_value = np.asarray(index.values("first")) <= difficulties["first"]
  rank = np.empty(N, np.int64)
  rank[np.asarray(index.index_to_sample("vocab_rarity"))] = np.arange(N)
  by_percentile = rank < difficulties["vocab_rarity"] * N // 100
  return set(np.flatnonzero(by_value & by_percentile).tolist())


def test_sampler_clusters_and_draws(index):
  sampler = two_metric_sampler(index)
  for _ in range(40):
    ids = sampler.next_indices()
    assert ids.shape == (16,) and ids.dtype == np.int64
    clustered = np.concatenate(sampler.clusters)
    assert len(set(clustered.tolist())) == clustered.size  # disjoint
    allowed = eligible(index, sampler.difficulties)
    assert set(clustered.tolist()) == allowed
    assert set(ids.tolist()) <= allowed
  assert sampler.difficulties == {"first": 50, "vocab_rarity": 100}
  assert len(sampler.clusters) > 3
  assert sum(c.size for c in sampler.clusters) == N  # everything eligible at the end


def test_small_cluster_cycles_and_empty_cluster_skipped(index):
  values = np.asarray(index.values("even"))
  d0 = np.sort(values)[2]  # the 3 easiest samples (ties aside)
  schedule = CurriculumSchedule("custom", 0, 100, custom=lambda t: d0 if t < 4 else d0 + 1)
  sampler = CurriculumSampler(index, {"even": MetricCurriculum(schedule)}, 16, seed=3)
  first = sampler.next_indices()
  assert set(first.tolist()) == set(np.flatnonzero(values <= d0).tolist())
  for _ in range(5):
    sampler.next_indices()  # at t = 4 the difficulty changes but no even value is new
  assert len(sampler.clusters) == 1


def test_no_eligible_sample_raises(index):
  schedule = CurriculumSchedule("custom", 0, 100, custom=lambda t: -1)
  sampler = CurriculumSampler(index, {"first": MetricCurriculum(schedule)}, 4, seed=0)
  with pytest.raises(ValueError, match="no sample is eligible"):
    sampler.next_indices()


def test_sampler_resume_is_exact(index):
  full = two_metric_sampler(index)
  expected = [full.next_indices() for _ in range(40)]

  first = two_metric_sampler(index)
  got = [first.next_indices() for _ in range(15)]
  state = json.loads(json.dumps(first.state()))
  np.random.seed(123)  # noqa: NPY002  (the global RNG must not matter)
  np.random.random(7)  # noqa: NPY002
  resumed = two_metric_sampler(index, seed=999)
  resumed.restore(state)
  got += [resumed.next_indices() for _ in range(25)]
  for a, b in zip(expected, got, strict=True):
    np.testing.assert_array_equal(a, b)


def test_bad_difficulty_type(index):
  schedule = CurriculumSchedule("fixed_linear", 1, 10, total_curriculum_step=5)
  with pytest.raises(ConfigError) as e:
    CurriculumSampler(index, {"first": MetricCurriculum(schedule, "rank")}, 4, seed=0)
  assert e.value.key == "data_efficiency.curriculum.difficulty_type"
  schedule = CurriculumSchedule("fixed_linear", 1, 110, total_curriculum_step=5)
  with pytest.raises(ConfigError) as e:
    CurriculumSampler(index, {"first": MetricCurriculum(schedule, "percentile")}, 4, seed=0)
  assert e.value.key == "data_efficiency.curriculum.max_difficulty"
