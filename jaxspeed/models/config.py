"""The model hyperparameters, as one frozen dataclass built from ``config.model``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

if TYPE_CHECKING:  # jaxspeed.moe builds on jaxspeed.models
  from jaxspeed.moe.config import MoeConfig

POSITIONS = ("learned", "rope", "alibi")
REMAT_POLICIES = ("none", "full", "save_matmul_outputs")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and options shared by the GPT decoder and the BERT encoder."""

  vocab_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0  # grouped-query attention; 0 means num_heads (multi-head)
  d_model: int = 64
  d_ff: int = 256
  max_seq_len: int = 128
  position: str = "learned"
  embed_layernorm: bool = False  # BLOOM's LayerNorm right after the embedding
  tie_embeddings: bool = True
  dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat: str = "none"
  attention: str = "xla"
  type_vocab_size: int = 2  # BERT token types
  layernorm_eps: float = 1e-5
  gelu_approximate: bool = True  # tanh GELU; BERT checkpoints use the exact (erf) one
  moe: MoeConfig | None = None  # mixture of experts in some layers (GPT); None: dense

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
