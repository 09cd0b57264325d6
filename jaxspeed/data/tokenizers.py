"""Tokenizers: raw UTF-8 bytes, or a byte-level BPE trained locally."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers as hf_tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxspeed.errors import ConfigError

TOKENIZER_NAMES: tuple[str, ...] = ("byte", "bpe")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(abc.ABC):
  """Text <-> int32 token ids, ids in ``[0, vocab_size)``."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of distinct token ids."""

  @abc.abstractmethod
  def encode(self, text: str) -> np.ndarray:
    """Returns int32[num_tokens]."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Inverse of ``encode``; invalid byte sequences decode to U+FFFD."""

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes many documents; subclasses may parallelize."""
    return [self.encode(t) for t in texts]


class ByteTokenizer(Tokenizer):
  """One token per UTF-8 byte; needs no training."""

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


class BpeTokenizer(Tokenizer):
  """Byte-level BPE (GPT-2 style) backed by the ``tokenizers`` package.

  All 256 bytes are in the base alphabet, so any text encodes without unknown
  tokens and ``decode(encode(text)) == text``.
  """

  def __init__(self, tokenizer: hf_tokenizers.Tokenizer):
    self._tok = tokenizer

  @classmethod
  def train(cls, docs: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Learns merges on ``docs``; the result depends only on the documents.

    Args:
      docs: training documents.
      vocab_size: target size including the 256 byte tokens; may end up smaller
        if the corpus runs out of pairs to merge.
    """
    if vocab_size < 256:
      raise ConfigError("data.bpe_vocab_size", f"byte-level BPE needs >= 256, got {vocab_size}")
    tok = hf_tokenizers.Tokenizer(models.BPE())
    # No prefix space: encode/decode must round-trip text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return cls(tok)

  @staticmethod
  def _file(path: str | os.PathLike[str]) -> str:
    path = os.fspath(path)
    return os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path

  def save(self, path: str | os.PathLike[str]) -> str:
    """Writes ``tokenizer.json`` to ``path`` (a file, or an existing directory).

    Returns:
      The file written.
    """
    file = self._file(path)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    self._tok.save(file)
    return file

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> BpeTokenizer:
    """Reads a tokenizer written by ``save`` (a file, or a directory holding one)."""
    return cls(hf_tokenizers.Tokenizer.from_file(cls._file(path)))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def get_vocab(self) -> dict[str, int]:
    """Token string -> id."""
    return self._tok.get_vocab()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts))]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


def make_tokenizer(name: str, docs: Iterable[str], vocab_size: int) -> Tokenizer:
  """Builds ``config.data.tokenizer``.

  Args:
    name: ``"byte"`` (``docs`` and ``vocab_size`` are ignored) or ``"bpe"``
      (trained on ``docs``).
    docs: training documents for ``"bpe"``.
    vocab_size: BPE vocabulary size.
  """
  if name == "byte":
    return ByteTokenizer()
  if name == "bpe":
    return BpeTokenizer.train(docs, vocab_size)
  raise ConfigError("data.tokenizer",
                    f"unknown tokenizer {name!r}; allowed values are {', '.join(TOKENIZER_NAMES)}")
