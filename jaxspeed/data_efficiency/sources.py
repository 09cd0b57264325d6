"""Builds the curriculum train-batch source of ``config.data_efficiency``."""

from __future__ import annotations

import os
import tempfile

import ml_collections

from jaxspeed.data.loader import BatchIterator
from jaxspeed.data_efficiency.analyzer import analyze
from jaxspeed.data_efficiency.batches import SampledBatches, SeqlenCurriculum
from jaxspeed.data_efficiency.config import CurriculumConfig, SeqlenConfig
from jaxspeed.data_efficiency.curriculum import CurriculumSchedule
from jaxspeed.data_efficiency.sampler import CurriculumSampler

_SECTIONS = {"data_efficiency.seqlen": SeqlenConfig,
             "data_efficiency.curriculum": CurriculumConfig}


def schedule_from_config(section: ml_collections.ConfigDict, key: str) -> CurriculumSchedule:
  """The checked ``CurriculumSchedule`` of ``config.<key>`` (a curriculum section)."""
  return _SECTIONS[key].from_config({**section, "enabled": True}).schedule


def curriculum_source(config: ml_collections.ConfigDict, train_data: BatchIterator,
                      workdir: str | None, process_index: int = 0, process_count: int = 1):
  """``train_data``, or a source drawing and cutting it per ``config.data_efficiency``.

  The curriculum sampler analyzes the train windows first (``analyze``; the
  index is written to ``<workdir>/data_analysis``, or a temporary directory).

  Raises:
    ConfigError: for a bad curriculum setting, before anything compiles.
  """
  curriculum = CurriculumConfig.from_config(config.data_efficiency.curriculum)
  seqlen = SeqlenConfig.from_config(config.data_efficiency.seqlen)
  source = train_data
  if curriculum.enabled:
    directory = (os.path.join(workdir, "data_analysis") if workdir
                 else tempfile.mkdtemp(prefix="jaxspeed_analysis_"))
    index = analyze(train_data.windows, [curriculum.metric], directory,
                    num_workers=curriculum.analysis_workers)
    sampler = CurriculumSampler(index, {curriculum.metric: curriculum.metric_curriculum},
                                config.batch_size, config.seed)
    source = SampledBatches(train_data.windows, sampler, process_index, process_count)
  if seqlen.enabled:
    source = SeqlenCurriculum(source, seqlen.schedule, seqlen.mode)
  return source
