"""Inference: KV-cache generation, tensor-parallel decoding and KV-cache compression."""

from jaxspeed.inference.engine import Generator, prompt_bucket
from jaxspeed.inference.kv_cache import KVCache, attention_weights, cache_bytes
from jaxspeed.inference.sampling import SamplingConfig, sample_logits

__all__ = [
  "Generator",
  "KVCache",
  "SamplingConfig",
  "attention_weights",
  "cache_bytes",
  "prompt_bucket",
  "sample_logits",
]
