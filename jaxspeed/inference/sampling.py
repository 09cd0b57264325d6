"""Next-token sampling: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspeed.schema import Section, setting


@dataclasses.dataclass(frozen=True)
class SamplingConfig(Section):
  """How the next token is drawn from the logits.

  Attributes:
    temperature: 0 for greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose probability
      reaches p (Holtzman et al. 2020); 1.0 = all.
  """

  KEY = "inference"  # the fields of config.inference (RLHF's sampling reuses them)

  temperature: float = setting(0.0, ge=0)
  top_k: int = setting(0, ge=0)
  top_p: float = setting(1.0, gt=0, le=1)


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Draws one token per row: logits [B, V] float32 -> ids [B] int32."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    mass_before = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1) - jax.nn.softmax(
        ordered, axis=-1)
    # The smallest logit still needed to reach top_p (the first token is always kept).
    cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, ordered, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
