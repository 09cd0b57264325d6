"""Masked-language-model batches for the BERT encoder (Devlin et al. 2019, §3.1).

Of each sequence, ``rate`` of the positions are selected; a selected token is
replaced by ``mask_id`` 80% of the time, by a random token 10% of the time,
and kept 10% of the time. The loss counts only selected positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxspeed.data.loader import Batch, BatchIterator


class MaskedLMBatches:
  """Wraps a ``BatchIterator`` of causal windows into MLM batches.

  Each row's mask is drawn from an RNG seeded by (seed, step, global row), so
  the batch does not depend on how many processes read it.

  Batches: ``inputs`` int32[B_local, S] (corrupted), ``targets`` int32[B_local, S]
  (original tokens), ``loss_mask`` float32[B_local, S] (1 at selected positions).
  """

  def __init__(self, source: BatchIterator, mask_id: int, rate: float = 0.15):
    self.source = source
    self.mask_id = mask_id
    self.rate = rate

  @property
  def state(self) -> dict[str, Any]:
    return self.source.state

  def restore(self, state: Mapping[str, Any]) -> None:
    self.source.restore(state)

  def batch_at(self, step: int) -> Batch:
    tokens = self.source.batch_at(step)["inputs"]
    inputs, loss_mask = tokens.copy(), np.zeros(tokens.shape, np.float32)
    first_row = self.source.process_index * self.source.local_batch_size
    for i in range(tokens.shape[0]):
      rng = np.random.default_rng([self.source.seed, step, first_row + i])
      selected = rng.random(tokens.shape[1]) < self.rate
      action = rng.random(tokens.shape[1])
      random_tokens = rng.integers(0, self.mask_id, tokens.shape[1])
      inputs[i] = np.where(selected & (action < 0.8), self.mask_id, inputs[i])
      inputs[i] = np.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, inputs[i])
      loss_mask[i] = selected
    return {"inputs": inputs.astype(np.int32), "targets": tokens, "loss_mask": loss_mask}

  def next_batch(self) -> Batch:
    batch = self.batch_at(self.source.step)
    self.source.step += 1
    return batch
