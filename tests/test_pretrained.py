"""all-MiniLM-L6-v2 loaded into jaxspeed's BERT encoder from the installed package."""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxspeed.models.pretrained import (
  UNUSED_TENSORS,
  MiniLMTokenizer,
  convert_bert_weights,
  load_minilm,
  minilm_dir,
  sentence_embeddings,
  tensor_map,
)


@pytest.fixture(scope="module")
def minilm():
  cfg, params = load_minilm()
  return cfg, params, load_file(minilm_dir() / "model.safetensors")


def test_every_tensor_is_mapped_or_known_unused(minilm):
  cfg, params, tensors = minilm
  mapped = tensor_map(cfg)
  assert set(tensors) == set(mapped) | set(UNUSED_TENSORS)
  assert len(jax.tree.leaves(params)) == len(mapped) == 5 + 16 * cfg.num_layers
  # One value checked through the transpose and head split: PyTorch [out, in] -> [in, h, hd].
  q = tensors["encoder.layer.2.attention.self.query.weight"]
  np.testing.assert_array_equal(params["layer_2"]["attention"]["query"][:, 1, :],
                                q.T[:, cfg.head_dim:2 * cfg.head_dim])


def test_missing_misnamed_and_misshapen_tensors_are_clear_errors(minilm):
  cfg, _, tensors = minilm
  missing = {k: v for k, v in tensors.items() if k != "encoder.layer.3.output.dense.bias"}
  with pytest.raises(ValueError, match=r"missing tensors \['encoder.layer.3.output.dense.bias'\]"):
    convert_bert_weights(missing, cfg)
  renamed = dict(missing, **{"encoder.layer.3.output.dense.b": tensors[
      "encoder.layer.3.output.dense.bias"]})
  with pytest.raises(ValueError, match=r"unknown tensors \['encoder.layer.3.output.dense.b'\]"):
    convert_bert_weights(renamed, cfg)
  bad = dict(tensors, **{"embeddings.LayerNorm.bias": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match=r"embeddings.LayerNorm.bias -> ln_embed/bias: shape"):
    convert_bert_weights(bad, cfg)


def test_paraphrases_score_higher_than_unrelated_sentences(minilm):
  cfg, params, _ = minilm
  sentences = ["A man is playing a guitar.", "Someone is playing the guitar.",
               "The stock market fell sharply today.", "Share prices dropped a lot today."]
  ids, mask = MiniLMTokenizer(max_length=16)(sentences)
  assert ids[0, 0] == 101 and mask[0].sum() < 16  # [CLS] first, padded
  e = np.asarray(jax.jit(lambda p, i, m: sentence_embeddings(cfg, p, i, m))(params, ids, mask))
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
  sim = e @ e.T
  assert min(sim[0, 1], sim[2, 3]) > 0.6
  assert max(sim[0, 2], sim[0, 3], sim[1, 2], sim[1, 3]) < 0.2
