"""``config.data_efficiency``: DeepSpeed Data Efficiency (Li et al. 2022); all off by default.

Curricula, random layerwise token dropping and progressive layer dropping.
"""

from __future__ import annotations

import dataclasses

from jaxspeed.data_efficiency.analyzer import BUILTIN_METRICS
from jaxspeed.data_efficiency.curriculum import SCHEDULE_TYPES, CurriculumSchedule
from jaxspeed.data_efficiency.sampler import DIFFICULTY_TYPES, MetricCurriculum
from jaxspeed.data_efficiency.seqlen import SEQLEN_MODES
from jaxspeed.schema import Section, setting


@dataclasses.dataclass(frozen=True)
class ScheduleSection(Section):
  """A curriculum's on switch and DeepSpeed's ``schedule_config`` keys (``CurriculumSchedule``)."""

  enabled: bool = setting(False)
  schedule_type: str = setting("fixed_linear", choices=SCHEDULE_TYPES[:-1])  # not "custom"
  min_difficulty: int = setting(8)
  max_difficulty: int = setting(128)
  total_curriculum_step: int = setting(100)
  difficulty_step: int = setting(8)
  root_degree: int = setting(1)
  difficulties: list[int] = setting(factory=lambda: [0])
  max_steps: list[int] = setting(factory=lambda: [0])

  @property
  def schedule(self) -> CurriculumSchedule:
    return CurriculumSchedule(self.schedule_type, self.min_difficulty, self.max_difficulty,
                              self.total_curriculum_step, self.difficulty_step,
                              self.root_degree, self.difficulties, self.max_steps)

  def check(self) -> None:
    if self.enabled:  # a switched-off schedule is never read
      self.schedule.validate(self.KEY)


@dataclasses.dataclass(frozen=True)
class SeqlenConfig(ScheduleSection):
  """Sequence-length warm-up (Li et al. 2021): each batch cut to the scheduled length."""

  KEY = "data_efficiency.seqlen"

  mode: str = setting("seqlen_truncate", choices=SEQLEN_MODES)


@dataclasses.dataclass(frozen=True)
class CurriculumConfig(ScheduleSection):
  """Curriculum sampling over a data-analyzer metric, easiest samples first."""

  KEY = "data_efficiency.curriculum"

  schedule_type: str = setting("fixed_root", choices=SCHEDULE_TYPES[:-1])
  min_difficulty: int = setting(1)
  max_difficulty: int = setting(100)
  difficulty_step: int = setting(1)
  root_degree: int = setting(2)
  metric: str = setting("vocab_rarity", choices=BUILTIN_METRICS)
  difficulty_type: str = setting("percentile", choices=DIFFICULTY_TYPES)
  analysis_workers: int = setting(1, ge=1)

  @property
  def metric_curriculum(self) -> MetricCurriculum:
    return MetricCurriculum(self.schedule, self.difficulty_type)

  def check(self) -> None:
    if self.enabled:
      self.metric_curriculum.validate(self.KEY)


@dataclasses.dataclass(frozen=True)
class RandomLtdConfig(Section):
  """Random layerwise token dropping: the kept length grows from ``min_value`` to
  ``max_value`` (0: seq_len) by ``seq_per_step`` every ``require_steps`` steps."""

  KEY = "data_efficiency.random_ltd"

  enabled: bool = setting(False)
  min_value: int = setting(16, ge=1)
  max_value: int = setting(0, ge=0)
  require_steps: int = setting(100, ge=1)
  seq_per_step: int = setting(16, ge=1)


@dataclasses.dataclass(frozen=True)
class PldConfig(Section):
  """Progressive layer dropping: theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar."""

  KEY = "data_efficiency.pld"

  enabled: bool = setting(False)
  theta: float = setting(0.5, gt=0, le=1)
  gamma: float = setting(0.001, ge=0)


@dataclasses.dataclass(frozen=True)
class DataEfficiencyConfig(Section):
  KEY = "data_efficiency"

  seqlen: SeqlenConfig = setting(factory=SeqlenConfig)
  curriculum: CurriculumConfig = setting(factory=CurriculumConfig)
  random_ltd: RandomLtdConfig = setting(factory=RandomLtdConfig)
  pld: PldConfig = setting(factory=PldConfig)
