"""Validation loss in bits per byte, so runs with different tokenizers compare.

A model's loss in nats per token depends on how much text a token covers. Over
the validation targets, bits/byte = (total nats) / (UTF-8 bytes of the text
they encode) / ln 2 = loss_per_token · tokens / bytes / ln 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from jaxspeed.data.tokenizers import Tokenizer


def target_bytes(tokenizer: Tokenizer, targets: np.ndarray) -> int:
  """UTF-8 bytes of the text that ``targets`` [..., S] encode, row by row.

  A row cut inside a multi-byte character decodes that fragment as U+FFFD
  (3 bytes); at one fragment per row end this is noise.
  """
  rows = np.asarray(targets).reshape(-1, np.shape(targets)[-1])
  return sum(len(tokenizer.decode(row).encode("utf-8")) for row in rows)


def bits_per_byte(nats_per_token: float, tokens: int, num_bytes: int) -> float:
  """``nats_per_token · tokens / num_bytes / ln 2``."""
  return nats_per_token * tokens / num_bytes / math.log(2)


def validation_bits_per_byte(tokenizer: Tokenizer, batches: Iterable[dict[str, np.ndarray]],
                             nats_per_token: float) -> float:
  """``bits_per_byte`` of a mean validation loss over the batches it was measured on.

  Args:
    tokenizer: the run's tokenizer.
    batches: the validation batches (this process's rows) with ``targets``.
    nats_per_token: their mean loss.
  """
  tokens = num_bytes = 0
  for batch in batches:
    tokens += batch["targets"].size
    num_bytes += target_bytes(tokenizer, batch["targets"])
  return bits_per_byte(nats_per_token, tokens, num_bytes)
