"""Text corpora: a download-free default and user files.

A corpus is a ``list[str]`` of documents. Documents, not windows, are the unit of
the train/validation split so that no text leaks from one side into the other.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from jaxspeed.errors import ConfigError

PYTHON_DOCS = "python_docs"
MIN_PYTHON_DOCS_CHARS = 2_000_000

# Pure-Python stdlib modules present on CPython 3.10-3.13 whose source is mostly
# prose-heavy docstrings plus idiomatic code. Modules that became thin shims over
# a private module (``datetime``, ``decimal``) are left out.
STDLIB_MODULES: tuple[str, ...] = tuple(sorted((
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "email.message", "enum",
    "fractions", "functools", "getopt", "gettext", "glob", "heapq", "http.client", "inspect",
    "ipaddress", "json", "json.decoder", "json.encoder", "json.scanner", "logging", "numbers",
    "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "random", "shlex",
    "shutil", "statistics", "string", "tarfile",
    "tempfile", "textwrap", "threading", "tokenize", "typing", "urllib.parse", "uuid",
    "zipfile",
)))


def _module_source(name: str) -> str | None:
  """Source text of stdlib module ``name``, or None if absent or shipped without source."""
  try:
    spec = importlib.util.find_spec(name)
  except (ImportError, ValueError):
    return None
  # Some distributions ship only bytecode; `origin` is then a .pyc or "frozen".
  if spec is None or not spec.origin or not spec.origin.endswith(".py"):
    return None
  try:
    with open(spec.origin, encoding="utf-8") as f:
      return f.read()
  except OSError:
    return None


@functools.cache
def _python_docs() -> tuple[str, ...]:
  from pydoc_data.topics import topics

  docs = [topics[key] for key in sorted(topics)]
  docs += [src for name in STDLIB_MODULES if (src := _module_source(name))]
  total = sum(len(d) for d in docs)
  if total < MIN_PYTHON_DOCS_CHARS:
    raise RuntimeError(
        f"the built-in '{PYTHON_DOCS}' corpus has only {total:,} characters (need "
        f"{MIN_PYTHON_DOCS_CHARS:,}); this Python seems to ship without stdlib sources. "
        "Set data.corpus to your own .txt/.jsonl files instead.")
  return tuple(docs)


def python_docs_corpus() -> list[str]:
  """The default corpus: Python's help topics plus stdlib module sources (~2.5 MB).

  Ships with every CPython, so it needs no download. The order is deterministic:
  ``pydoc_data.topics`` values sorted by key, then ``STDLIB_MODULES`` in order
  (modules missing on this interpreter are skipped).

  Returns:
    A new list of documents, one string each.
  """
  return list(_python_docs())


def load_text_files(
    paths: Iterable[str | os.PathLike[str]], jsonl_field: str = "text"
) -> list[str]:
  """Reads documents from user files.

  Args:
    paths: ``.jsonl`` files give one document per non-blank line, taken from
      ``jsonl_field``; any other file is one document.
    jsonl_field: JSON key holding the text of a ``.jsonl`` record.

  Returns:
    The non-blank documents, in file order and then line order.

  Raises:
    ConfigError: a path is not a file, a file is not UTF-8, or a ``.jsonl`` line
      is not a record with a string ``jsonl_field``.
  """
  docs: list[str] = []
  for path in paths:
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise ConfigError("data.corpus", f"no such file: {path!r}")
    try:
      with open(path, encoding="utf-8") as f:
        docs += _jsonl_documents(f, path, jsonl_field) if path.endswith(".jsonl") else [f.read()]
    except UnicodeDecodeError as e:
      raise ConfigError("data.corpus", f"{path} is not UTF-8 text (byte {e.start} cannot be "
                        "decoded); give .txt or .jsonl text files") from e
  # Blank documents (e.g. an empty file) hold no tokens; dropping them keeps the
  # document count honest for the train/validation split.
  return [d for d in docs if d.strip()]


def _jsonl_documents(lines: Iterable[str], path: str, jsonl_field: str) -> list[str]:
  docs = []
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError("data.corpus", f"{path}:{lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(record, dict) or jsonl_field not in record:
      raise ConfigError("data.jsonl_field", f"{path}:{lineno}: record has no field "
                        f"{jsonl_field!r} (set data.jsonl_field to the key that holds the text)")
    text = record[jsonl_field]
    if not isinstance(text, str):
      raise ConfigError("data.corpus", f"{path}:{lineno}: field {jsonl_field!r} is "
                        f"{type(text).__name__}, expected a string")
    docs.append(text)
  return docs


def load_corpus(spec: str, jsonl_field: str = "text") -> list[str]:
  """Resolves ``config.data.corpus``.

  Args:
    spec: ``"python_docs"`` for the built-in corpus, else comma-separated paths.
    jsonl_field: JSON key holding the text in ``.jsonl`` files.

  Returns:
    The documents.
  """
  if spec.strip() == PYTHON_DOCS:
    return python_docs_corpus()
  paths = [p.strip() for p in spec.split(",") if p.strip()]
  if not paths:
    raise ConfigError("data.corpus",
                      f"expected {PYTHON_DOCS!r} or comma-separated file paths, got {spec!r}")
  docs = load_text_files(paths, jsonl_field=jsonl_field)
  if not docs:
    raise ConfigError("data.corpus", f"the files in {spec!r} contain no text")
  return docs


def split_documents(
    docs: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
  """Deterministic document-level train/validation split.

  Args:
    docs: ``n >= 2`` documents.
    val_fraction: in ``(0, 1)``; the validation side gets ``max(1, ceil(val_fraction * n))``
      documents, and the train side at least one.
    seed: shuffles the documents before splitting.

  Returns:
    ``(train_docs, val_docs)``, each in shuffled order.
  """
  n = len(docs)
  if not 0.0 < val_fraction < 1.0:
    raise ConfigError("data.val_fraction", f"must be in (0, 1), got {val_fraction}")
  if n < 2:
    raise ConfigError("data.corpus", f"has {n} document; the train/validation split is by "
                      "document and needs at least 2: give several files, or a .jsonl file "
                      "with one document per line")
  n_val = min(max(1, math.ceil(val_fraction * n)), n - 1)
  order = np.random.default_rng(seed).permutation(n)
  shuffled = [docs[i] for i in order]
  return shuffled[: n - n_val], shuffled[n - n_val :]
