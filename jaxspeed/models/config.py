"""``config.model``: the model hyperparameters, as one frozen dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from jaxspeed.errors import ConfigError
from jaxspeed.models.attention import ATTENTION_IMPLS
from jaxspeed.schema import Section, setting

if TYPE_CHECKING:  # jaxspeed.moe builds on jaxspeed.models
  from jaxspeed.moe.config import MoeConfig

POSITIONS = ("learned", "rope", "alibi")
REMAT_POLICIES = ("none", "full", "save_matmul_outputs", "offload")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODEL_NAMES = ("gpt", "bert")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
  """Sizes and options shared by the GPT decoder and the BERT encoder.

  The fields after ``attention`` are set by code (pretrained checkpoints, the
  MoE section), not by ``config.model``.
  """

  KEY = "model"

  vocab_size: int = setting(256, ge=1)
  num_layers: int = setting(2, ge=1)
  num_heads: int = setting(4, ge=1)
  # Grouped-query attention; 0 means num_heads (multi-head).
  num_kv_heads: int = setting(0, ge=0)
  d_model: int = setting(64, ge=1)
  d_ff: int = setting(256, ge=1)
  max_seq_len: int = setting(128, ge=1)
  position: str = setting("learned", choices=POSITIONS)
  embed_layernorm: bool = setting(False)  # BLOOM's LayerNorm right after the embedding
  tie_embeddings: bool = setting(True)
  dropout: float = setting(0.0, ge=0, lt=1)
  dtype: str = setting("float32", choices=DTYPES)  # compute dtype
  # The dtype the train state stores parameters in; below float32 the optimizer keeps a
  # float32 master copy (``jaxspeed.optimizers.master``).
  param_dtype: str = setting("float32", choices=DTYPES)
  remat: str = setting("none", choices=REMAT_POLICIES)
  attention: str = setting("xla", choices=ATTENTION_IMPLS)  # a registry, read when checked
  name: str = setting("gpt", choices=MODEL_NAMES)  # the trainer's model; unused by the layers
  type_vocab_size: int = setting(2, config=False)  # BERT token types
  layernorm_eps: float = setting(1e-5, config=False)
  # tanh GELU; BERT checkpoints use the exact (erf) one.
  gelu_approximate: bool = setting(True, config=False)
  # The blocks' parameters live in host memory (``zero.offload_params``).
  params_on_host: bool = setting(False, config=False)
  # Mixture of experts in some layers (GPT); None: dense.
  moe: MoeConfig | None = setting(None, config=False)

  def check(self) -> None:
    if self.d_model % self.num_heads:
      raise ConfigError("model.num_heads",
                        f"must divide model.d_model={self.d_model}, got {self.num_heads}")
    if self.num_heads % self.kv_heads:
      raise ConfigError("model.num_kv_heads", f"must divide model.num_heads={self.num_heads} "
                        f"(0 means num_heads), got {self.num_kv_heads}")
    if self.position == "rope" and self.head_dim % 2:
      raise ConfigError("model.position", "rope needs an even head dimension")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @classmethod
  def from_config(cls, model: Mapping[str, Any], moe: MoeConfig | None = None) -> ModelConfig:
    """Reads and checks ``config.model``; ``moe`` is kept if it has experts."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"moe"}
    return cls(**{k: v for k, v in dict(model).items() if k in fields},
               moe=moe if moe is not None and moe.enabled else None)

  def experts_at(self, layer: int) -> int:
    """Experts of layer ``layer``'s feed-forward block; 0 for a dense MLP."""
    return 0 if self.moe is None else self.moe.experts_at(layer)

  def num_params(self, include_embeddings: bool = True) -> int:
    """Parameter count of the GPT decoder, computed from the shapes."""
    d, f = self.d_model, self.d_ff
    kv = self.kv_heads * self.head_dim
    attention = 2 * d * d + 2 * d * kv + 2 * d + 2 * kv
    per_layer = attention + 2 * d * f + f + d + 4 * d
    total = self.num_layers * per_layer + 2 * d
    if include_embeddings:
      total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
      if self.position == "learned":
        total += self.max_seq_len * d
    return total

  def flops_per_token(self, seq_len: int) -> int:
    """Training FLOPs per token: 6·N (non-embedding + LM head) + 12·L·S·d attention.

    The formula of the PaLM paper (Chowdhery et al. 2022, appendix B), used for MFU.
    """
    n = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
    return 6 * n + 12 * self.num_layers * seq_len * self.d_model
