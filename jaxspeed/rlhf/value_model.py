"""The reward model and critic: a GPT trunk with a scalar value head (DeepSpeed-Chat step 2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.errors import ConfigError
from jaxspeed.models.config import ModelConfig
from jaxspeed.models.gpt import GPT
from jaxspeed.models.layers import param_init

TRUNK = "lm"  # the language model's parameters sit under this key
VALUE_HEAD = "v_head"


class ValueModel(nn.Module):
  """``__call__(tokens [B, S]) -> values [B, S]`` float32, one scalar per token.

  The final-LayerNorm features of a ``GPT`` times a bias-free [d_model, 1]
  head, as DeepSpeed-Chat's ``RewardModel`` (``v_head = Linear(hidden, 1,
  bias=False)``). The trunk's parameters keep the language model's names, so
  an SFT checkpoint initializes it (``value_params_from_lm``).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    cfg = self.config
    features = GPT(cfg, name=TRUNK)(tokens, positions, deterministic, features_only=True)
    head = self.param(VALUE_HEAD, param_init(("embed", None)), (cfg.d_model, 1))
    return (features @ head.astype(features.dtype))[..., 0].astype(jnp.float32)


def value_params_from_lm(value_params, lm_params):
  """``value_params`` with its trunk replaced by a language model's parameters.

  The LM head (untied embeddings) has no use in the value model and is dropped.

  Raises:
    ConfigError: if the language model lacks a parameter the trunk needs.
  """
  trunk = value_params[TRUNK]
  missing = sorted(set(trunk) - set(lm_params))
  if missing:
    raise ConfigError("model", f"the language model has no {', '.join(missing)} for the value "
                      "model's trunk; it must be a GPT of the same model config")
  return {**value_params, TRUNK: {k: lm_params[k] for k in trunk}}


def check_value_model(params, key: str) -> None:
  """Raises ``ConfigError`` naming ``key`` unless ``params`` are a ``ValueModel``'s."""
  if not isinstance(params, dict) or VALUE_HEAD not in params or TRUNK not in params:
    raise ConfigError(key, f"holds a model without a value head ('{VALUE_HEAD}'): a reward "
                      "model or critic must be trained as a ValueModel (the reward step)")
