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


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
  """int64 [vocab]: the bytes each token id stands for.

  1 for the byte tokenizer; for byte-level BPE, the length of the token's
  string in the 256-character byte alphabet (one character per byte), so
  tokens that end inside a multi-byte character count exactly.
  """
  if not hasattr(tokenizer, "get_vocab"):
    return np.ones(tokenizer.vocab_size, np.int64)
  lengths = np.zeros(tokenizer.vocab_size, np.int64)
  for token, i in tokenizer.get_vocab().items():
    lengths[i] = len(token)
  return lengths


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
  lengths = token_byte_lengths(tokenizer)
  tokens = num_bytes = 0
  for batch in batches:
    tokens += batch["targets"].size
    num_bytes += int(lengths[batch["targets"]].sum())
  return bits_per_byte(nats_per_token, tokens, num_bytes)
