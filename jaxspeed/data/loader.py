"""Deterministic, checkpointable batches of fixed-length token windows.

The batch for global step ``i`` is a pure function of ``(seed, i)``: the window
order is the infinite concatenation of per-epoch permutations, each seeded by
``(seed, epoch)``, and step ``i`` reads positions ``[i * B, (i + 1) * B)`` of it.
So the whole iterator state is ``{"step": i}``, and restoring it on any number of
processes resumes exactly the same global stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxspeed.data.tokenizers import Tokenizer
from jaxspeed.errors import ConfigError

Batch = dict[str, np.ndarray]


def concat_tokens(
    docs: Sequence[str], tokenizer: Tokenizer, separator_id: int | None = None
) -> np.ndarray:
  """Tokenizes ``docs`` and joins them into one int32[num_tokens] stream.

  Args:
    docs: documents.
    tokenizer: any ``Tokenizer``.
    separator_id: if given, appended after every document (e.g. an end-of-text id).
  """
  parts = tokenizer.encode_batch(list(docs))
  if separator_id is not None:
    sep = np.asarray([separator_id], dtype=np.int32)
    parts = [p for doc in parts for p in (doc, sep)]
  if not parts:
    return np.zeros((0,), np.int32)
  return np.concatenate(parts).astype(np.int32, copy=False)


class TokenWindows:
  """A token stream cut into non-overlapping windows of ``seq_len + 1`` tokens.

  The trailing ``num_tokens % (seq_len + 1)`` tokens are dropped.

  Args:
    tokens: int[num_tokens], all documents concatenated.
    seq_len: model sequence length S; each window holds S + 1 tokens so that
      inputs and targets (shifted by one) are both S long.
    name: what ``tokens`` are, for the error message (e.g. "validation split").
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "corpus"):
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype}{tokens.shape}")
    if seq_len < 1:
      raise ConfigError("seq_len", f"must be >= 1, got {seq_len}")
    n = tokens.shape[0] // (seq_len + 1)
    if n == 0:
      raise ConfigError(
          "seq_len", f"the {name} has {tokens.shape[0]} tokens, fewer than one window of "
          f"seq_len + 1 = {seq_len + 1}; use a bigger corpus (data.corpus) or a smaller seq_len")
    self.seq_len = seq_len
    # int32[num_windows, S + 1], a view into one contiguous buffer.
    self.windows = tokens[: n * (seq_len + 1)].astype(np.int32).reshape(n, seq_len + 1)

  def __len__(self) -> int:
    return self.windows.shape[0]

  def __getitem__(self, idx: np.ndarray | int) -> Batch:
    """Returns ``inputs``, ``targets``: int32[..., S] for window index(es) ``idx``."""
    w = self.windows[idx]
    # Contiguous so the arrays transfer to devices without another copy.
    return {"inputs": np.ascontiguousarray(w[..., :-1]),
            "targets": np.ascontiguousarray(w[..., 1:])}


class BatchIterator(Iterator[Batch]):
  """Infinite stream of this process's rows of each global batch.

  Process ``p`` of ``P`` gets rows ``[p * B / P, (p + 1) * B / P)`` of global batch
  ``B`` and reads only those windows.

  Args:
    windows: the dataset.
    global_batch_size: B, rows per step summed over all processes.
    seed: seeds the per-epoch permutations (ignored when not shuffling).
    process_index: this process, in ``[0, process_count)``.
    process_count: P, must divide B.
    shuffle: False reads windows in order (validation).
  """

  def __init__(
      self,
      windows: TokenWindows,
      global_batch_size: int,
      seed: int,
      *,
      process_index: int = 0,
      process_count: int = 1,
      shuffle: bool = True,
  ):
    if global_batch_size < 1:
      raise ConfigError("batch_size", f"must be >= 1, got {global_batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    if global_batch_size % process_count:
      raise ConfigError(
          "batch_size",
          f"{global_batch_size} is not divisible by the {process_count} processes")
    self.windows = windows
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle = shuffle
    self.step = 0
    self._perms: dict[int, np.ndarray] = {}

  @property
  def steps_per_epoch(self) -> int:
    """Whole global batches in one pass over the windows (at least 1)."""
    return max(1, len(self.windows) // self.global_batch_size)

  @property
  def state(self) -> dict[str, Any]:
    """JSON-able; ``restore(state)`` resumes the stream here."""
    return {"step": self.step}

  def restore(self, state: Mapping[str, Any]) -> None:
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"cannot restore a negative step: {step}")
    self.step = step

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
      # A batch spans at most a few adjacent epochs; keep the cache tiny.
      if len(self._perms) >= 4:
        self._perms.pop(min(self._perms))
      self._perms[epoch] = perm
    return perm

  def window_indices(self, step: int) -> np.ndarray:
    """int64[B_local]: the window index of each of this process's rows at ``step``."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
    n = len(self.windows)
    offsets = positions % n
    if not self.shuffle:
      return offsets
    epochs = positions // n
    out = np.empty_like(offsets)
    for epoch in np.unique(epochs):
      rows = epochs == epoch
      out[rows] = self._permutation(int(epoch))[offsets[rows]]
    return out

  def batch_at(self, step: int) -> Batch:
    """``inputs``, ``targets``: int32[B_local, S] for global step ``step``; no side effects."""
    return self.windows[self.window_indices(step)]

  def next_batch(self) -> Batch:
    batch = self.batch_at(self.step)
    self.step += 1
    return batch

  def __next__(self) -> Batch:
    return self.next_batch()


def make_datasets(
    docs_train: Sequence[str],
    docs_val: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[BatchIterator, BatchIterator]:
  """Tokenizes both splits and returns ``(train_iter, val_iter)``.

  The validation iterator is unshuffled, so its step ``i`` is always the same data.
  """
  def build(docs: Sequence[str], shuffle: bool) -> BatchIterator:
    n = len(docs)
    name = f"{'train' if shuffle else 'validation'} split ({n} document{'s' * (n != 1)})"
    windows = TokenWindows(concat_tokens(docs, tokenizer), seq_len, name)
    return BatchIterator(windows, global_batch_size, seed, process_index=process_index,
                         process_count=process_count, shuffle=shuffle)

  return build(docs_train, shuffle=True), build(docs_val, shuffle=False)
