"""Inference: token sampling from trained decoders."""

from jaxspeed.inference.sampling import sample_tokens

__all__ = ["sample_tokens"]
