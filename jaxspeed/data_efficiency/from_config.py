"""Builds the curriculum train-batch source of ``config.data_efficiency``."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import ml_collections

from jaxspeed.data.loader import BatchIterator
from jaxspeed.data_efficiency.analyzer import BUILTIN_METRICS, analyze
from jaxspeed.data_efficiency.batches import SampledBatches, SeqlenCurriculum
from jaxspeed.data_efficiency.curriculum import CurriculumSchedule
from jaxspeed.data_efficiency.sampler import CurriculumSampler, MetricCurriculum
from jaxspeed.data_efficiency.seqlen import SEQLEN_MODES
from jaxspeed.errors import ConfigError

_SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(CurriculumSchedule)
                         if f.name != "custom")


def schedule_from_config(section: ml_collections.ConfigDict, key: str) -> CurriculumSchedule:
  """The ``CurriculumSchedule`` of a config section holding DeepSpeed's schedule keys."""
  return CurriculumSchedule.from_config({k: section[k] for k in _SCHEDULE_FIELDS}, key)


def curriculum_source(config: ml_collections.ConfigDict, train_data: BatchIterator,
                      workdir: str | None, process_index: int = 0, process_count: int = 1):
  """``train_data``, or a source drawing and cutting it per ``config.data_efficiency``.

  The curriculum sampler analyzes the train windows first (``analyze``; the
  index is written to ``<workdir>/data_analysis``, or a temporary directory).

  Raises:
    ConfigError: for a bad curriculum setting, before anything compiles.
  """
  de = config.data_efficiency
  source = train_data
  if de.curriculum.enabled:
    key = "data_efficiency.curriculum"
    if de.curriculum.metric not in BUILTIN_METRICS:
      raise ConfigError(f"{key}.metric", f"got {de.curriculum.metric!r}; allowed values: "
                        f"{', '.join(BUILTIN_METRICS)}")
    metric = MetricCurriculum(schedule_from_config(de.curriculum, key),
                              de.curriculum.difficulty_type)
    metric.validate(key)
    directory = (os.path.join(workdir, "data_analysis") if workdir
                 else tempfile.mkdtemp(prefix="jaxspeed_analysis_"))
    index = analyze(train_data.windows, [de.curriculum.metric], directory,
                    num_workers=de.curriculum.analysis_workers)
    sampler = CurriculumSampler(index, {de.curriculum.metric: metric},
                                config.batch_size, config.seed)
    source = SampledBatches(train_data.windows, sampler, process_index, process_count)
  if de.seqlen.enabled:
    key = "data_efficiency.seqlen"
    if de.seqlen.mode not in SEQLEN_MODES:
      raise ConfigError(f"{key}.mode", f"got {de.seqlen.mode!r}; allowed values: "
                        f"{', '.join(SEQLEN_MODES)}")
    source = SeqlenCurriculum(source, schedule_from_config(de.seqlen, key), de.seqlen.mode)
  return source
