"""``config.data``: the corpus and its tokenizer."""

from __future__ import annotations

import dataclasses

from jaxspeed.data.tokenizers import TOKENIZER_NAMES
from jaxspeed.schema import Section, setting


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """Attributes:
    corpus: ``python_docs`` (built in) or comma-separated .txt / .jsonl paths.
    jsonl_field: the key holding the text of a .jsonl record.
    bpe_vocab_size: byte-level BPE vocabulary, the 256 bytes included.
    val_fraction: documents held out for validation.
  """

  KEY = "data"

  corpus: str = setting("python_docs")
  jsonl_field: str = setting("text")
  tokenizer: str = setting("byte", choices=TOKENIZER_NAMES)
  bpe_vocab_size: int = setting(1024, ge=256)
  val_fraction: float = setting(0.05, gt=0, lt=1)
