"""A preference task built from real text that ships with Python.

DeepSpeed-Chat trains on human preference sets (Anthropic HH and others),
which cannot be downloaded here. The stand-in keeps their shape: a prompt
is a window of real text (Python's docs and sources by default), the chosen
answer is its true continuation, and the rejected answer is a corrupted
one, either

* ``shuffle``: the same words in a random order (fluent-looking bytes,
  broken syntax), or
* ``swap``: the true continuation of some other prompt (fluent text that
  does not follow).

A reward model must read both the answer and its fit to the prompt, and a
policy that PPO pushes towards higher reward writes more text-like answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxspeed.data.tokenizers import Tokenizer
from jaxspeed.errors import ConfigError

REJECTION_KINDS = ("shuffle", "swap")
_CHUNK = 3  # tokens per shuffled piece when an answer has no word breaks


@dataclasses.dataclass(frozen=True)
class PreferencePairs:
  """Prompts [N, P] and chosen / rejected answers [N, A], int32 token ids."""

  prompts: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray

  def __len__(self) -> int:
    return len(self.prompts)

  def take(self, rows: np.ndarray) -> PreferencePairs:
    return PreferencePairs(self.prompts[rows], self.chosen[rows], self.rejected[rows])

  def sequences(self, which: str) -> np.ndarray:
    """[N, P + A]: the prompts followed by the ``chosen`` or ``rejected`` answers."""
    return np.concatenate([self.prompts, getattr(self, which)], axis=1)

  def batch_rows(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    """The rows of batch ``step``: a fixed function of (seed, step), so runs resume exactly."""
    return np.random.default_rng([seed, step]).choice(len(self), batch_size,
                                                      replace=batch_size > len(self))


def shuffle_words(answer: np.ndarray, space_id: int | None, rng: np.random.Generator
                  ) -> np.ndarray:
  """The answer's words (pieces ending at ``space_id``) in another order; same length.

  Without word breaks it permutes pieces of 3 tokens instead. Returns the
  answer unchanged only when no permutation differs (a single repeated piece).
  """
  cuts = [i + 1 for i, t in enumerate(answer[:-1]) if t == space_id]
  pieces = np.split(answer, cuts) if cuts else np.split(answer, range(_CHUNK, len(answer), _CHUNK))
  for _ in range(8):
    order = rng.permutation(len(pieces))
    shuffled = np.concatenate([pieces[i] for i in order])
    if not np.array_equal(shuffled, answer):
      return shuffled
  return answer


def continuation_pairs(docs: Sequence[str], tokenizer: Tokenizer, prompt_len: int,
                       answer_len: int, num_pairs: int, seed: int,
                       kinds: Sequence[str] = REJECTION_KINDS) -> PreferencePairs:
  """``num_pairs`` (prompt, true continuation, corrupted continuation) triples.

  Windows of ``prompt_len + answer_len`` tokens are drawn uniformly from
  ``docs``; pair i is corrupted by ``kinds[i % len(kinds)]``. Pairs whose two
  answers come out equal are dropped.

  Raises:
    ConfigError: if a kind is unknown or no document is long enough.
  """
  for kind in kinds:
    if kind not in REJECTION_KINDS:
      raise ConfigError("rlhf.rejected", f"unknown kind {kind!r}; allowed values: "
                        f"{', '.join(REJECTION_KINDS)}")
  window = prompt_len + answer_len
  encoded = [np.asarray(tokenizer.encode(d), np.int32) for d in docs]
  encoded = [e for e in encoded if len(e) >= window]
  if not encoded or num_pairs < 1:
    raise ConfigError("rlhf.num_pairs", f"no preference pairs: need num_pairs >= 1 (got "
                      f"{num_pairs}) and documents of at least prompt_len + answer_len = "
                      f"{window} tokens")
  rng = np.random.default_rng(seed)
  starts_per_doc = np.array([len(e) - window + 1 for e in encoded])
  doc_ids = rng.choice(len(encoded), num_pairs, p=starts_per_doc / starts_per_doc.sum())
  windows = np.stack([encoded[d][s: s + window] for d, s in
                      zip(doc_ids, rng.integers(0, starts_per_doc[doc_ids]))])
  prompts, chosen = windows[:, :prompt_len], windows[:, prompt_len:]
  space = tokenizer.encode(" ")
  space_id = int(space[0]) if len(space) == 1 else None
  rejected = np.empty_like(chosen)
  for i in range(num_pairs):
    if kinds[i % len(kinds)] == "shuffle":
      rejected[i] = shuffle_words(chosen[i], space_id, rng)
    else:
      rejected[i] = chosen[(i + 1 + rng.integers(max(num_pairs - 1, 1))) % num_pairs]
  keep = np.any(chosen != rejected, axis=1)
  return PreferencePairs(prompts[keep], chosen[keep], rejected[keep])
