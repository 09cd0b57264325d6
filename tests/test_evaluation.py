"""Validation loss in bits per byte."""

import math

import numpy as np

from jaxspeed.data.tokenizers import BpeTokenizer, ByteTokenizer
from jaxspeed.training.evaluation import token_byte_lengths, validation_bits_per_byte


def test_byte_tokenizer_bits_per_byte_is_nats_over_ln2():
  batch = {"targets": ByteTokenizer().encode("héllo wörld")[None]}  # 13 bytes, 13 tokens
  got = validation_bits_per_byte(ByteTokenizer(), [batch], nats_per_token=2.0)
  assert math.isclose(got, 2.0 / math.log(2))


def test_bpe_counts_the_bytes_its_tokens_decode_to():
  text = "the cat sat on the mat; the cat ate the rat. é"
  tok = BpeTokenizer.train([text] * 20, vocab_size=280)
  ids = tok.encode(text)
  assert len(ids) < len(text.encode())  # merges happened
  assert token_byte_lengths(tok)[ids].sum() == len(text.encode("utf-8"))
  got = validation_bits_per_byte(tok, [{"targets": ids[None]}], nats_per_token=1.0)
  assert math.isclose(got, len(ids) / len(text.encode()) / math.log(2))
  assert np.all(token_byte_lengths(tok) >= 1)
