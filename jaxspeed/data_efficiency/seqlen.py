"""Sequence-length curriculum: shorten the rows of a batch to the current difficulty.

The two post-processing modes of DeepSpeed Data Efficiency's ``single_cluster``
seqlen metric (arXiv 2212.03597, §3.1). DeepSpeed keeps ``length + 1`` tokens of
the unshifted sequence; a jaxspeed batch is already split into ``inputs`` and
``targets`` of S tokens each, so ``length`` here is the model sequence length.

A batch is a dict of int32[B, S] ``inputs`` and ``targets`` plus an optional
[B, S] ``loss_mask``; every entry is cut the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxspeed.errors import ConfigError

SEQLEN_MODES = ("seqlen_truncate", "seqlen_reshape")

Batch = dict[str, np.ndarray]


def _check_length(batch: Mapping[str, np.ndarray], length: int) -> tuple[int, int]:
  """Returns (B, S) after checking every entry is [B, S] and 1 <= length <= S."""
  shapes = {name: np.shape(x) for name, x in batch.items()}
  if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
    raise ValueError(f"every batch entry must have the same shape [B, S], got {shapes}")
  b, s = next(iter(shapes.values()))
  if not 1 <= length <= s:
    raise ValueError(f"sequence length must be in [1, {s}], got {length}")
  return b, s


def truncate_batch(batch: Mapping[str, np.ndarray], length: int) -> Batch:
  """Keeps the first ``length`` tokens of every row: [B, S] -> [B, length].

  Drops S − length tokens per row, so a step sees fewer tokens.
  """
  _check_length(batch, length)
  return {name: np.ascontiguousarray(x[:, :length]) for name, x in batch.items()}


def reshape_batch(batch: Mapping[str, np.ndarray], length: int) -> Batch:
  """Folds each row into k = S // length rows of ``length`` tokens: [B, S] -> [B·k, length].

  Row r of the input becomes rows [r·k, (r + 1)·k) of the output, so the pieces of
  one row stay together and the batch stays divisible the way B was (each data
  shard keeps its own rows). The step sees the same number of tokens, but each
  folded row is a separate sequence: its positions restart at 0 and it does not
  attend to the piece before it. When S % length != 0 the last S % length tokens
  of every row are dropped.
  """
  b, s = _check_length(batch, length)
  k = s // length
  return {name: np.ascontiguousarray(x[:, : k * length].reshape(b * k, length))
          for name, x in batch.items()}


def apply_seqlen(batch: Mapping[str, np.ndarray], mode: str, length: int) -> Batch:
  """``truncate_batch`` or ``reshape_batch``, chosen by ``mode`` in ``SEQLEN_MODES``."""
  if mode == "seqlen_truncate":
    return truncate_batch(batch, length)
  if mode == "seqlen_reshape":
    return reshape_batch(batch, length)
  raise ConfigError("data_efficiency.seqlen.mode",
                    f"got {mode!r}; allowed values: {', '.join(SEQLEN_MODES)}")
