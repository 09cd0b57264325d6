"""Models: GPT decoder and BERT encoder as flax.linen modules with logical axes."""

from jaxspeed.models.attention import ATTENTION_IMPLS, causal_mask, dot_product_attention
from jaxspeed.models.bert import BertEncoder, BertForMaskedLM
from jaxspeed.models.blockwise_attention import blockwise_attention  # registers "blockwise"
from jaxspeed.models.config import ModelConfig
from jaxspeed.models.evoformer_attention import evoformer_attention
from jaxspeed.models.flash_attention import sharded_flash_attention  # registers "flash"
from jaxspeed.models.gpt import GPT
from jaxspeed.models.pipelined_gpt import PipelinedGPT
from jaxspeed.models.positions import alibi_bias, alibi_slopes, apply_rope

MODELS = {"gpt": GPT, "bert": BertForMaskedLM}


def build_model(name: str, config: ModelConfig, num_stages: int = 1, microbatches: int = 1,
                schedule: str = "gpipe", virtual_stages: int = 1):
  """The flax module for ``config.model.name``; pipelined over ``num_stages`` if > 1."""
  if name not in MODELS:
    raise ValueError(f"model.name={name!r}; allowed: {sorted(MODELS)}")
  if num_stages > 1:
    if name != "gpt":
      raise ValueError(f"pipeline parallelism supports model.name='gpt', got {name!r}")
    return PipelinedGPT(config, num_stages=num_stages, microbatches=microbatches,
                        schedule=schedule, virtual_stages=virtual_stages)
  return MODELS[name](config)


__all__ = [
  "ATTENTION_IMPLS",
  "GPT",
  "MODELS",
  "BertEncoder",
  "BertForMaskedLM",
  "ModelConfig",
  "PipelinedGPT",
  "alibi_bias",
  "alibi_slopes",
  "apply_rope",
  "blockwise_attention",
  "build_model",
  "causal_mask",
  "dot_product_attention",
  "evoformer_attention",
  "sharded_flash_attention",
]
