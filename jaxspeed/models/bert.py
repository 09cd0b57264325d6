"""BERT encoder (Devlin et al. 2019): post-LN, token types, masked-LM head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.models.config import ModelConfig
from jaxspeed.models.layer_runner import run_layers
from jaxspeed.models.layers import (
    Embed,
    LayerNorm,
    constrain,
    param_init,
    remat_block,
    zeros_init,
)
from jaxspeed.models.random_ltd import gather_tokens


class BertEncoder(nn.Module):
  """Bidirectional encoder returning hidden states [B, S, d_model]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None,
               padding_mask: jax.Array | None = None, deterministic: bool = True, *,
               random_ltd_kept: int | None = None,
               layer_keep_theta: jax.Array | None = None) -> jax.Array:
    """tokens, token_types: [B, S] int; padding_mask: [B, S] bool, True for real tokens.

    Args:
      random_ltd_kept: Random-LTD's kept length r (static); layers 1..L-2
        each run on r random tokens per row, with the ``random_ltd`` rng.
        Off when None or >= S.
      layer_keep_theta: Progressive Layer Dropping's θ(t) (float32 scalar);
        layers are dropped with the ``layer_drop`` rng. Off when None. The
        paper uses a pre-LN BERT; here the post-LN residual branches are scaled.

    Both are training-only (pass None to evaluate), as in DeepSpeed.
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    token_types = jnp.zeros_like(tokens) if token_types is None else token_types
    x = Embed(cfg.vocab_size, cfg.d_model, name="embed")(tokens, dtype)
    pos = self.param("pos_embed", param_init((None, "embed")), (cfg.max_seq_len, cfg.d_model))
    types = self.param("type_embed", param_init((None, "embed")),
                       (cfg.type_vocab_size, cfg.d_model))
    x = x + jnp.take(pos, positions, axis=0).astype(dtype)
    x = x + jnp.take(types, token_types, axis=0).astype(dtype)
    x = LayerNorm(cfg.layernorm_eps, name="ln_embed")(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = constrain(x, ("batch", "seq", "embed"))
    block = remat_block(cfg, self.is_initializing())

    def make_layer(i: int, per_row_positions: bool) -> nn.Module:
      return block(cfg, causal=False, pre_ln=False, per_row_positions=per_row_positions,
                   name=f"layer_{i}")

    def mask_for(idx: jax.Array | None) -> jax.Array | None:
      valid = padding_mask if idx is None or padding_mask is None else gather_tokens(
          padding_mask, idx)
      return None if valid is None else valid[:, None, None, :]

    return run_layers(self, make_layer, cfg.num_layers, x, positions, mask_for, deterministic,
                      random_ltd_kept, layer_keep_theta)


class BertForMaskedLM(nn.Module):
  """Encoder + MLM head (dense → GELU → LayerNorm → tied decoder + bias).

  ``__call__`` returns float32 logits [B, S, vocab].
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None,
               padding_mask: jax.Array | None = None, deterministic: bool = True, *,
               random_ltd_kept: int | None = None,
               layer_keep_theta: jax.Array | None = None) -> jax.Array:
    """Arguments as for ``BertEncoder``."""
    cfg = self.config
    dtype = cfg.compute_dtype
    encoder = BertEncoder(cfg, name="encoder")
    x = encoder(tokens, token_types, padding_mask, deterministic,
                random_ltd_kept=random_ltd_kept, layer_keep_theta=layer_keep_theta)
    w = self.param("mlm_dense", param_init(("embed", None)), (cfg.d_model, cfg.d_model))
    b = self.param("mlm_dense_bias", zeros_init((None,)), (cfg.d_model,))
    x = LayerNorm(cfg.layernorm_eps, name="mlm_ln")(jax.nn.gelu(x @ w.astype(dtype) + b))
    table = encoder.variables["params"]["embed"]["table"]
    table = table.unbox() if isinstance(table, nn.LogicallyPartitioned) else table
    bias = self.param("mlm_bias", zeros_init(("vocab",)), (cfg.vocab_size,))
    logits = jnp.einsum("bsd,vd->bsv", x, table.astype(dtype)) + bias
    return constrain(logits, ("batch", "seq", "vocab")).astype(jnp.float32)

