"""Tests for jaxspeed.data: corpus, tokenizers and the deterministic batch stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxspeed.data import (
    BatchIterator,
    BpeTokenizer,
    ByteTokenizer,
    TokenWindows,
    concat_tokens,
    load_corpus,
    load_text_files,
    make_datasets,
    make_tokenizer,
    python_docs_corpus,
    split_documents,
)
from jaxspeed.errors import ConfigError

UNICODE_TEXT = "naïve café — 東京 😀 Ωmega\n\tdef f(x):\n    return x  # ok\n"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  return python_docs_corpus()


@pytest.fixture(scope="module")
def small_docs(corpus) -> list[str]:
  return corpus[::10]  # ~250 KB: enough for BPE, fast to train


def _windows(num_windows: int = 23, seq_len: int = 4) -> TokenWindows:
  # Window w holds tokens w*(S+1) .. w*(S+1)+S, so a row identifies its window.
  return TokenWindows(np.arange(num_windows * (seq_len + 1) + 2, dtype=np.int32), seq_len)


def _window_ids(batch, seq_len: int = 4) -> np.ndarray:
  return batch["inputs"][:, 0] // (seq_len + 1)


# --- corpus -------------------------------------------------------------------------------


def test_python_docs_corpus_is_large_mixed_and_deterministic(corpus):
  assert sum(len(d) for d in corpus) > 2_000_000
  text = "\n".join(corpus)
  assert "def " in text and "class " in text
  assert "the " in text and "The " in text  # English prose from the help topics
  assert python_docs_corpus() == corpus
  assert load_corpus("python_docs") == corpus


def test_split_documents_is_deterministic_disjoint_and_sized():
  docs = [f"doc {i}" for i in range(50)]
  train, val = split_documents(docs, 0.1, seed=3)
  assert len(val) == 5 and len(train) == 45
  assert sorted(train + val) == sorted(docs)
  assert (train, val) == split_documents(docs, 0.1, seed=3)
  assert (train, val) != split_documents(docs, 0.1, seed=4)
  assert len(split_documents(docs, 0.001, seed=0)[1]) == 1  # at least one val doc


def test_load_text_and_jsonl_files(tmp_path):
  txt = tmp_path / "a.txt"
  txt.write_text("first document\nstill first", encoding="utf-8")
  jsonl = tmp_path / "b.jsonl"
  jsonl.write_text('{"text": "second"}\n\n{"text": "third ü", "id": 3}\n', encoding="utf-8")
  assert load_text_files([txt, jsonl]) == ["first document\nstill first", "second", "third ü"]
  assert load_corpus(f"{txt}, {jsonl}") == ["first document\nstill first", "second", "third ü"]

  other = tmp_path / "c.jsonl"
  other.write_text('{"body": "x"}\n', encoding="utf-8")
  assert load_text_files([other], jsonl_field="body") == ["x"]
  with pytest.raises(ValueError, match=r"c\.jsonl:1.*'text'"):
    load_text_files([other])


def test_missing_file_error_names_path_and_config_key(tmp_path):
  missing = tmp_path / "nope.txt"
  with pytest.raises(ConfigError) as e:
    load_corpus(str(missing))
  assert e.value.key == "data.corpus"
  # One prefix: the message does not repeat the key.
  assert str(e.value).startswith("config.data.corpus: no such file") and "nope.txt" in str(e.value)


# --- tokenizers ---------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_unicode():
  tok = ByteTokenizer()
  ids = tok.encode(UNICODE_TEXT)
  assert tok.vocab_size == 256
  assert ids.dtype == np.int32 and len(ids) == len(UNICODE_TEXT.encode("utf-8"))
  assert ids.min() >= 0 and ids.max() < 256
  assert tok.decode(ids) == UNICODE_TEXT
  assert tok.decode([0xE6, 0x9D]) == "\ufffd"  # truncated multi-byte char is replaced


def test_bpe_round_trips_compresses_and_trains_deterministically(small_docs, tmp_path):
  tok = BpeTokenizer.train(small_docs, vocab_size=1024)
  assert tok.vocab_size == 1024
  for text in (UNICODE_TEXT, small_docs[0][:5000]):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
  sample = small_docs[1]
  assert len(tok.encode(sample)) < 0.6 * len(sample.encode("utf-8"))

  again = BpeTokenizer.train(small_docs, vocab_size=1024)
  assert again.get_vocab() == tok.get_vocab()
  path_a, path_b = tok.save(tmp_path / "a.json"), again.save(tmp_path / "b.json")
  with open(path_a) as a, open(path_b) as b:
    assert json.load(a)["model"]["merges"] == json.load(b)["model"]["merges"]

  (tmp_path / "dir").mkdir()
  tok.save(tmp_path / "dir")
  loaded = BpeTokenizer.load(tmp_path / "dir")
  np.testing.assert_array_equal(loaded.encode(sample), tok.encode(sample))


def test_make_tokenizer():
  assert isinstance(make_tokenizer("byte", [], 0), ByteTokenizer)
  bpe = make_tokenizer("bpe", ["hello world, hello there"] * 20, 300)
  assert isinstance(bpe, BpeTokenizer) and bpe.vocab_size <= 300
  with pytest.raises(ValueError, match=r"data\.tokenizer.*byte.*bpe"):
    make_tokenizer("sentencepiece", [], 1000)


# --- windows and batches ------------------------------------------------------------------


def test_windows_targets_shift_by_one():
  windows = _windows(num_windows=5, seq_len=4)
  assert len(windows) == 5  # the 2 trailing tokens are dropped
  batch = windows[np.array([0, 3])]
  np.testing.assert_array_equal(batch["inputs"], [[0, 1, 2, 3], [15, 16, 17, 18]])
  np.testing.assert_array_equal(batch["targets"], [[1, 2, 3, 4], [16, 17, 18, 19]])
  with pytest.raises(ValueError, match="fewer than one window"):
    TokenWindows(np.arange(4, dtype=np.int32), seq_len=4)


def test_concat_tokens_with_separator():
  tokens = concat_tokens(["ab", "c"], ByteTokenizer(), separator_id=0)
  np.testing.assert_array_equal(tokens, [97, 98, 0, 99, 0])
  assert tokens.dtype == np.int32


def test_batches_are_seeded():
  windows = _windows()
  def stream(seed):
    it = BatchIterator(windows, 4, seed)
    return [_window_ids(next(it)) for _ in range(10)]

  a, b, c = stream(0), stream(0), stream(1)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c, strict=True))
  batch = BatchIterator(windows, 4, 0).batch_at(0)
  assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (4, 4)


def test_restore_reproduces_the_rest_of_the_stream():
  windows = _windows()
  full = BatchIterator(windows, 5, seed=7)
  expected = [full.next_batch() for _ in range(20)]

  first = BatchIterator(windows, 5, seed=7)
  for _ in range(8):
    first.next_batch()
  state = json.loads(json.dumps(first.state))  # survives a JSON round trip
  resumed = BatchIterator(windows, 5, seed=7)
  resumed.restore(state)
  for want in expected[8:]:
    got = resumed.next_batch()
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["targets"], want["targets"])


def test_each_epoch_covers_every_window_once_across_batch_boundaries():
  windows = _windows(num_windows=23)  # 23 is not a multiple of 5: epochs end mid-batch
  it = BatchIterator(windows, 5, seed=0)
  stream = np.concatenate([_window_ids(it.batch_at(i)) for i in range(5 * 23 // 5)])
  epochs = stream.reshape(5, 23)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(23))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch

  # A batch bigger than the dataset wraps over several epochs.
  big = BatchIterator(_windows(num_windows=3), 7, seed=0)
  np.testing.assert_array_equal(np.sort(_window_ids(big.batch_at(0))[:6]), [0, 0, 1, 1, 2, 2])


def test_unshuffled_is_sequential():
  it = BatchIterator(_windows(num_windows=7), 3, seed=0, shuffle=False)
  ids = np.concatenate([_window_ids(next(it)) for _ in range(3)])
  np.testing.assert_array_equal(ids, [0, 1, 2, 3, 4, 5, 6, 0, 1])


@pytest.mark.parametrize("shuffle", [True, False])
def test_process_slices_concatenate_to_the_global_batch(shuffle):
  windows = _windows()
  single = BatchIterator(windows, 8, seed=3, shuffle=shuffle)
  procs = [BatchIterator(windows, 8, seed=3, process_index=p, process_count=4, shuffle=shuffle)
           for p in range(4)]
  for step in (0, 1, 5, 17):
    parts = [p.batch_at(step) for p in procs]
    assert all(part["inputs"].shape == (2, 4) for part in parts)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]),
                                    single.batch_at(step)[key])
  with pytest.raises(ValueError, match="divisible"):
    BatchIterator(windows, 6, seed=0, process_index=0, process_count=4)


def test_make_datasets(small_docs):
  train_docs, val_docs = split_documents(small_docs, 0.2, seed=0)
  train, val = make_datasets(train_docs, val_docs, ByteTokenizer(), seq_len=32,
                             global_batch_size=4, seed=0, process_index=1, process_count=2)
  batch = next(train)
  assert batch["inputs"].shape == (2, 32) and batch["targets"].shape == (2, 32)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert train.state == {"step": 1} and val.state == {"step": 0}
  assert not val.shuffle and train.shuffle
