"""Tests for jaxspeed.data_efficiency curriculum schedules and seqlen post-processing."""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest

from jaxspeed.data_efficiency import (
    SEQLEN_MODES,
    CurriculumSchedule,
    apply_seqlen,
    reshape_batch,
    truncate_batch,
)
from jaxspeed.errors import ConfigError


def linear(min_d: int, max_d: int, total: int, step: int) -> CurriculumSchedule:
  return CurriculumSchedule("fixed_linear", min_d, max_d, total_curriculum_step=total,
                            difficulty_step=step)


def deepspeed_raw(s: CurriculumSchedule, t: int, root: int = 1) -> int:
  """DeepSpeed's float formula without the min clamp, for comparison."""
  d = math.floor((t / s.total_curriculum_step) ** (1.0 / root)
                 * (s.max_difficulty - s.min_difficulty) + s.min_difficulty)
  d -= d % s.difficulty_step
  return min(d, s.max_difficulty)


@pytest.mark.parametrize("t, expected", [
    (0, 8),     # 8 -> 8
    (10, 8),    # floor(0.1 * 56 + 8) = 13 -> 8
    (50, 32),   # 36 -> 32
    (99, 56),   # floor(63.44) = 63 -> 56
    (100, 64),
    (200, 64),  # 120, capped at max
])
def test_fixed_linear(t, expected):
  assert linear(8, 64, 100, 8).difficulty_at(t) == expected


@pytest.mark.parametrize("t, expected", [
    (0, 8),
    (1, 8),     # sqrt(0.01) * 56 + 8 = 13.6 -> 13 -> 8
    (25, 32),   # 0.5 * 56 + 8 = 36 -> 32
    (49, 40),   # 0.7 * 56 + 8 = 47.2 -> 40
    (64, 48),   # 0.8 * 56 + 8 = 52.8 -> 48
    (81, 56),   # 0.9 * 56 + 8 = 58.4 -> 56
    (100, 64),
    (400, 64),
])
def test_fixed_root(t, expected):
  s = CurriculumSchedule("fixed_root", 8, 64, total_curriculum_step=100, difficulty_step=8,
                         root_degree=2)
  assert s.difficulty_at(t) == expected


def test_fixed_discrete():
  s = CurriculumSchedule("fixed_discrete", 16, 64, difficulties=[16, 32, 64], max_steps=[10, 20])
  got = [s.difficulty_at(t) for t in (0, 10, 11, 20, 21, 1000)]
  assert got == [16, 16, 32, 32, 64, 64]


def test_custom():
  s = CurriculumSchedule("custom", 8, 64, custom=lambda t: 8 * (t // 10 + 1))
  assert [s.difficulty_at(t) for t in (0, 9, 10, 25)] == [8, 8, 16, 24]


def test_min_rounds_up_to_a_multiple_of_the_step():
  s = linear(10, 64, 100, 8)
  # DeepSpeed rounds 10 and 15 down to 8, below min_difficulty; we round min up to 16.
  assert [deepspeed_raw(s, t) for t in (0, 10)] == [8, 8]
  assert [s.difficulty_at(t) for t in (0, 10)] == [16, 16]
  # floor(0.5 * 54 + 10) = 37 -> 32; floor(0.99 * 54 + 10) = 63 -> 56.
  assert [s.difficulty_at(t) for t in (50, 99)] == [32, 56]
  # A min above the largest multiple below max ends at max.
  assert linear(60, 63, 100, 8).difficulty_at(0) == 63
  # Elsewhere the two agree: 10 + floor(10.8) = 20 -> 16.
  assert s.difficulty_at(20) == deepspeed_raw(s, 20) == 16
  assert s.difficulty_at(100) == deepspeed_raw(s, 100) == 64


def test_exact_floor():
  s = linear(0, 100, 100, 1)
  assert deepspeed_raw(s, 29) == 28  # (29 / 100) * 100 = 28.999... in floats
  assert s.difficulty_at(29) == 29
  assert [s.difficulty_at(t) for t in range(101)] == list(range(101))


def test_from_config():
  cfg = ml_collections.ConfigDict({
      "schedule_type": "fixed_root", "min_difficulty": 8, "max_difficulty": 64,
      "total_curriculum_step": 100, "difficulty_step": 8, "root_degree": 2})
  s = CurriculumSchedule.from_config(cfg)
  assert s.difficulty_at(25) == 32
  cfg.unknown = 1
  with pytest.raises(ConfigError) as e:
    CurriculumSchedule.from_config(cfg)
  assert e.value.key == "data_efficiency.curriculum.unknown"


@pytest.mark.parametrize("kwargs, key", [
    (dict(schedule_type="cosine"), "schedule_type"),
    (dict(min_difficulty=65), "min_difficulty"),
    (dict(difficulty_step=0), "difficulty_step"),
    (dict(total_curriculum_step=-1), "total_curriculum_step"),
    (dict(total_curriculum_step=None), "total_curriculum_step"),
    (dict(schedule_type="fixed_root", root_degree=0), "root_degree"),
    (dict(schedule_type="fixed_root"), "root_degree"),
    (dict(schedule_type="fixed_discrete", difficulties=[8, 16], max_steps=[]), "max_steps"),
    (dict(schedule_type="fixed_discrete", difficulties=[8, 16, 32], max_steps=[5, 5]),
     "max_steps"),
    (dict(schedule_type="fixed_discrete"), "difficulties"),
    (dict(schedule_type="custom"), "custom"),
])
def test_bad_config_names_key(kwargs, key):
  fields = dict(schedule_type="fixed_linear", min_difficulty=8, max_difficulty=64,
                total_curriculum_step=100, difficulty_step=8)
  fields.update(kwargs)
  with pytest.raises(ConfigError) as e:
    CurriculumSchedule(**fields).validate()
  assert e.value.key == f"data_efficiency.curriculum.{key}"
  if key == "schedule_type":
    assert "fixed_linear, fixed_root, fixed_discrete, custom" in str(e.value)


def make_batch(b: int = 2, s: int = 10) -> dict[str, np.ndarray]:
  inputs = np.arange(b * s, dtype=np.int32).reshape(b, s)
  return {"inputs": inputs, "targets": inputs + 1,
          "loss_mask": (inputs % 3 == 0).astype(np.float32)}


def test_truncate_batch():
  batch = make_batch()
  out = truncate_batch(batch, 4)
  for name, x in batch.items():
    assert out[name].shape == (2, 4)
    np.testing.assert_array_equal(out[name], x[:, :4])
  assert truncate_batch(batch, 10)["inputs"].shape == (2, 10)


@pytest.mark.parametrize("length", [5, 2, 10])
def test_reshape_batch_conserves_tokens(length):
  batch = make_batch()
  out = reshape_batch(batch, length)
  k = 10 // length
  for name, x in batch.items():
    assert out[name].shape == (2 * k, length)
    assert out[name].size == x.size
    for r in range(2):
      for j in range(k):
        np.testing.assert_array_equal(out[name][r * k + j], x[r, j * length:(j + 1) * length])


def test_reshape_batch_drops_remainder():
  batch = make_batch()
  out = reshape_batch(batch, 3)  # 10 = 3 * 3 + 1: the last token of each row goes
  assert out["inputs"].shape == (6, 3)
  np.testing.assert_array_equal(out["inputs"].reshape(2, 9), batch["inputs"][:, :9])
  assert out["inputs"].shape[0] % 2 == 0


def test_apply_seqlen():
  batch = make_batch()
  assert SEQLEN_MODES == ("seqlen_truncate", "seqlen_reshape")
  assert apply_seqlen(batch, "seqlen_truncate", 5)["targets"].shape == (2, 5)
  assert apply_seqlen(batch, "seqlen_reshape", 5)["targets"].shape == (4, 5)
  with pytest.raises(ConfigError):
    apply_seqlen(batch, "seqlen_pad", 5)
  for bad in (0, 11):
    with pytest.raises(ValueError):
      truncate_batch(batch, bad)
