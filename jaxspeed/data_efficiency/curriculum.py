"""Curriculum difficulty schedules: curriculum step -> difficulty.

The schedules of DeepSpeed's curriculum scheduler (Li et al. 2022, "The
Stability-Efficiency Dilemma", arXiv 2108.06084; DeepSpeed Data Efficiency,
arXiv 2212.03597). A difficulty is an integer, e.g. a sequence length or a
percentile of a data-analyzer metric; a curriculum step counts global batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxspeed.errors import ConfigError

SCHEDULE_TYPES = ("fixed_linear", "fixed_root", "fixed_discrete", "custom")
CONFIG_KEY = "data_efficiency.curriculum"


@dataclasses.dataclass(frozen=True)
class CurriculumSchedule:
  """A difficulty schedule, DeepSpeed semantics with one deliberate difference.

  ``fixed_root`` (Li et al. 2022, §4), at curriculum step t:

    d = floor((t / T)^(1 / r) · (max − min) + min)
    d −= d mod difficulty_step
    d = min(max(d, ⌈min / difficulty_step⌉ · difficulty_step), max)

  ``fixed_linear`` is ``fixed_root`` with r = 1. ``fixed_discrete`` returns
  ``difficulties[i]`` for the first i with t <= ``max_steps[i]``, and the last
  difficulty after that. ``custom`` returns ``custom(t)``.

  Differences from DeepSpeed:
    * The root schedules never return less than ``min_difficulty``: DeepSpeed's
      rounding down to a multiple of ``difficulty_step`` gives e.g. 8 for
      min 10, step 8 at t = 0; here the floor is ``min_difficulty`` rounded up
      to a multiple of ``difficulty_step`` (16), so every difficulty below
      ``max_difficulty`` stays a multiple of the step.
    * The floor is exact (integer arithmetic), where DeepSpeed's float pow can
      land just below an integer: (29 / 100) · 100 = 28.999... floors to 28.

  Attributes:
    schedule_type: one of ``SCHEDULE_TYPES``.
    min_difficulty: difficulty at t = 0 of the root schedules.
    max_difficulty: difficulty from t = T on.
    total_curriculum_step: T, the step at which the root schedules reach the max.
    difficulty_step: the root schedules round down to a multiple of this.
    root_degree: r of ``fixed_root``, a positive integer.
    difficulties: ``fixed_discrete`` difficulties, in order.
    max_steps: ``fixed_discrete`` last step of each difficulty but the final one.
    custom: ``custom`` callback, curriculum step -> difficulty.
  """

  schedule_type: str
  min_difficulty: int
  max_difficulty: int
  total_curriculum_step: int | None = None
  difficulty_step: int = 1
  root_degree: int | None = None
  difficulties: Sequence[int] = ()
  max_steps: Sequence[int] = ()
  custom: Callable[[int], int] | None = None

  def __post_init__(self):
    # Tuples keep the frozen dataclass hashable when lists are passed in.
    object.__setattr__(self, "difficulties", tuple(self.difficulties))
    object.__setattr__(self, "max_steps", tuple(self.max_steps))

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], key: str = CONFIG_KEY) -> CurriculumSchedule:
    """Reads and validates a schedule from a ``ml_collections.ConfigDict`` (or a dict).

    Args:
      cfg: holds ``schedule_type``, ``min_difficulty``, ``max_difficulty`` and the
        optional fields of this class under the same names.
      key: dotted path of ``cfg``, used in error messages.

    Raises:
      ConfigError: an unknown key or an invalid value.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    for name in cfg:
      if name not in fields:
        # A misplaced key would otherwise be silently ignored (DeepSpeedExamples #696).
        raise ConfigError(f"{key}.{name}", f"unknown key; known keys here: {', '.join(fields)}")
    for name in ("schedule_type", "min_difficulty", "max_difficulty"):
      if name not in cfg:
        raise ConfigError(f"{key}.{name}", "is required")
    schedule = cls(**{name: cfg[name] for name in fields if name in cfg})
    schedule.validate(key)
    return schedule

  def validate(self, key: str = CONFIG_KEY) -> None:
    """Raises ``ConfigError`` naming ``key.<field>`` for the first invalid field."""
    if self.schedule_type not in SCHEDULE_TYPES:
      raise ConfigError(f"{key}.schedule_type",
                        f"got {self.schedule_type!r}; allowed values: {', '.join(SCHEDULE_TYPES)}")
    if self.min_difficulty > self.max_difficulty:
      raise ConfigError(f"{key}.min_difficulty",
                        f"{self.min_difficulty} is above max_difficulty {self.max_difficulty}")
    if self.schedule_type in ("fixed_linear", "fixed_root"):
      for name in ("total_curriculum_step", "difficulty_step"):
        value = getattr(self, name)
        if not _is_int(value) or value <= 0:
          raise ConfigError(f"{key}.{name}", f"must be a positive integer, got {value!r}")
    if self.schedule_type == "fixed_root" and (
        not _is_int(self.root_degree) or self.root_degree <= 0):
      raise ConfigError(f"{key}.root_degree",
                        f"must be a positive integer, got {self.root_degree!r}")
    if self.schedule_type == "fixed_discrete":
      if not self.difficulties:
        raise ConfigError(f"{key}.difficulties", "must list at least one difficulty")
      if len(self.max_steps) != len(self.difficulties) - 1:
        raise ConfigError(
            f"{key}.max_steps",
            f"must have one entry fewer than difficulties ({len(self.difficulties) - 1}), "
            f"got {len(self.max_steps)}")
      if any(b <= a for a, b in zip(self.max_steps, self.max_steps[1:])):
        raise ConfigError(f"{key}.max_steps", f"must be increasing, got {list(self.max_steps)}")
    if self.schedule_type == "custom" and not callable(self.custom):
      raise ConfigError(f"{key}.custom",
                        f"schedule_type 'custom' needs a callable, got {self.custom!r}")

  def difficulty_at(self, step: int) -> int:
    """The difficulty at curriculum step ``step`` (global batches, from 0)."""
    if step < 0:
      raise ValueError(f"curriculum step must be >= 0, got {step}")
    if self.schedule_type == "fixed_discrete":
      for difficulty, last_step in zip(self.difficulties, self.max_steps):
        if step <= last_step:
          return int(difficulty)
      return int(self.difficulties[-1])
    if self.schedule_type == "custom":
      return int(self.custom(step))
    root = 1 if self.schedule_type == "fixed_linear" else self.root_degree
    d = self.min_difficulty + _floor_root_fraction(
        step, self.total_curriculum_step, root, self.max_difficulty - self.min_difficulty)
    unit = self.difficulty_step
    # Never below min_difficulty rounded up to a multiple of the step, so every
    # difficulty below max_difficulty is a multiple of difficulty_step.
    d = max(d - d % unit, -(-self.min_difficulty // unit) * unit)
    return min(d, self.max_difficulty)


def _floor_root_fraction(t: int, total: int, root: int, span: int) -> int:
  """floor((t / total)^(1 / root) · span), exactly, for non-negative integers."""
  k = math.floor((t / total) ** (1.0 / root) * span)
  # k is the largest integer with k^root · total <= t · span^root; fix float error.
  bound = t * span**root
  while k > 0 and k**root * total > bound:
    k -= 1
  while (k + 1) ** root * total <= bound:
    k += 1
  return k


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)
