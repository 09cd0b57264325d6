"""GPT decoder (Radford et al. 2019) with BLOOM's ALiBi and embedding-LayerNorm options."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.models.attention import causal_mask
from jaxspeed.models.config import ModelConfig
from jaxspeed.models.layers import Embed, LayerNorm, constrain, param_init, remat_block


class GPT(nn.Module):
  """Pre-LayerNorm causal decoder.

  ``__call__(tokens [B, S]) -> logits [B, S, vocab]`` in float32.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    cfg = self.config
    dtype = cfg.compute_dtype
    seq_len = tokens.shape[1]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq_len), tokens.shape)
    embed = Embed(cfg.vocab_size, cfg.d_model, name="embed")
    x = embed(tokens, dtype)
    if cfg.position == "learned":
      table = self.param("pos_embed", param_init((None, "embed")), (cfg.max_seq_len, cfg.d_model))
      x = x + jnp.take(table, positions, axis=0).astype(dtype)
    if cfg.embed_layernorm:
      x = LayerNorm(cfg.layernorm_eps, name="ln_embed")(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = constrain(x, ("batch", "seq", "embed"))
    block = remat_block(cfg.remat)
    mask = causal_mask(seq_len)
    for i in range(cfg.num_layers):
      x = block(cfg, causal=True, pre_ln=True, name=f"layer_{i}")(x, positions, mask,
                                                                   deterministic)
    x = LayerNorm(cfg.layernorm_eps, name="ln_final")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      w = self.param("lm_head", param_init(("embed", "vocab")), (cfg.d_model, cfg.vocab_size))
      logits = constrain(x @ w.astype(dtype), ("batch", "seq", "vocab"))
    return logits.astype(jnp.float32)
