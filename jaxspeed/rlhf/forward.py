"""The two forward passes every RLHF step shares: a policy's log-probs and a reward score."""

from __future__ import annotations

import jax

from jaxspeed.models.gpt import GPT
from jaxspeed.rlhf.losses import last_token_value, token_logprobs
from jaxspeed.rlhf.value_model import ValueModel


def policy_logprobs(model: GPT, params, tokens: jax.Array, **apply_kwargs) -> jax.Array:
  """tokens [B, S] -> [B, S]: log π(tokens[t+1] | tokens[:t+1]) at t (``token_logprobs``).

  ``apply_kwargs`` (``deterministic``, ``rngs``) go to ``model.apply``.
  """
  return token_logprobs(model.apply({"params": params}, tokens, **apply_kwargs), tokens)


def sequence_score(reward: ValueModel, params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """tokens, mask [B, S] -> [B]: the reward model's value at each row's last real token."""
  return last_token_value(reward.apply({"params": params}, tokens), mask)
