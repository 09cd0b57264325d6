"""Train-batch sources that apply a curriculum; drop-in for ``BatchIterator`` in the trainer.

Both keep their whole position in ``state`` (JSON, checkpointed with the run)
and count curriculum steps in global batches, as DeepSpeed does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxspeed.data.loader import Batch, TokenWindows
from jaxspeed.data_efficiency.curriculum import CurriculumSchedule
from jaxspeed.data_efficiency.sampler import CurriculumSampler
from jaxspeed.data_efficiency.seqlen import apply_seqlen


class SampledBatches:
  """This process's rows of each global batch drawn by a ``CurriculumSampler``.

  Args:
    windows: the samples the sampler's index was built from.
    sampler: draws global sample ids, easiest clusters first.
    process_index, process_count: this process takes rows
      ``[p·B/P, (p + 1)·B/P)`` of each global batch.
  """

  def __init__(self, windows: TokenWindows, sampler: CurriculumSampler,
               process_index: int = 0, process_count: int = 1):
    self.windows = windows
    self.sampler = sampler
    self.local_batch_size = sampler.global_batch_size // process_count
    self._start = process_index * self.local_batch_size

  @property
  def state(self) -> dict[str, Any]:
    return self.sampler.state()

  def restore(self, state: Mapping[str, Any]) -> None:
    self.sampler.restore(state)

  def next_batch(self) -> Batch:
    ids = self.sampler.next_indices()[self._start:self._start + self.local_batch_size]
    return self.windows[ids]


class SeqlenCurriculum:
  """Shortens each batch of ``source`` to the scheduled sequence length.

  Global batch t (1-based, DeepSpeed's ``update_difficulty(global_steps + 1)``)
  is cut to ``schedule.difficulty_at(t)`` tokens by ``mode``
  (``seqlen_truncate`` or ``seqlen_reshape``, see ``seqlen.py``). Lengths are
  multiples of ``difficulty_step``, so the train step compiles once per length.
  """

  def __init__(self, source, schedule: CurriculumSchedule, mode: str):
    self.source = source
    self.schedule = schedule
    self.mode = mode
    self.step = 0

  @property
  def state(self) -> dict[str, Any]:
    return {"curriculum_step": self.step, "source": self.source.state}

  def restore(self, state: Mapping[str, Any]) -> None:
    self.step = int(state["curriculum_step"])
    self.source.restore(state["source"])

  def length_at(self, step: int) -> int:
    """Sequence length of global batch ``step`` (0-based)."""
    return self.schedule.difficulty_at(step + 1)

  def shape_at(self, step: int, batch_size: int, seq_len: int) -> tuple[int, int]:
    """[rows, length] of global batch ``step`` cut from ``batch_size`` x ``seq_len``."""
    length = min(self.length_at(step), seq_len)
    if self.mode == "seqlen_reshape":
      return batch_size * (seq_len // length), length
    return batch_size, length

  def next_batch(self) -> Batch:
    batch = self.source.next_batch()
    length = min(self.length_at(self.step), np.shape(batch["inputs"])[1])
    self.step += 1
    return apply_seqlen(batch, self.mode, length)
