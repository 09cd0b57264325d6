"""GPT decoder (Radford et al. 2019) with BLOOM's ALiBi and embedding-LayerNorm options."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.models.attention import causal_mask
from jaxspeed.models.config import ModelConfig
from jaxspeed.models.layer_runner import run_layers
from jaxspeed.models.layers import Block, Embed, LayerNorm, constrain, param_init, remat_block
from jaxspeed.models.losses import cross_entropy


class GPT(nn.Module):
  """Pre-LayerNorm causal decoder.

  ``__call__(tokens [B, S]) -> logits [B, S, vocab]`` in float32.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               deterministic: bool = True, *, random_ltd_kept: int | None = None,
               layer_keep_theta: jax.Array | None = None, cache: tuple | None = None,
               features_only: bool = False, targets: jax.Array | None = None,
               loss_mask: jax.Array | None = None):
    """tokens, positions: [B, S] int.

    Args:
      random_ltd_kept: Random-LTD's kept length r (static); layers 1..L-2
        each run on r random tokens per row, with the ``random_ltd`` rng.
        Off when None or >= S.
      layer_keep_theta: Progressive Layer Dropping's θ(t) (float32 scalar);
        layers are dropped with the ``layer_drop`` rng. Off when None.

    Both are training-only (pass None to evaluate), as in DeepSpeed.

    With ``cache`` (one KV cache per layer, from ``jaxspeed.inference``) the
    tokens attend to the cache, which they extend; returns
    ``(logits, new_cache)``.

    With ``features_only`` it returns the final-LayerNorm hidden states
    [B, S, d_model] instead of logits (the trunk of a reward or value model).

    With ``targets`` [B, S] (and ``loss_mask`` [B, S], 1 where a target counts)
    it returns the summed cross-entropy and the counted tokens instead of
    logits (``jaxspeed.models.losses.cross_entropy``): the form a pipeline
    whose schedule needs each microbatch's loss inside it can compute.
    """
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
    if cache is not None:
      cache = list(cache)
      for i in range(cfg.num_layers):
        # Remat only matters for gradients; the parameter names are the same.
        x, cache[i] = Block(cfg, causal=True, pre_ln=True, name=f"layer_{i}")(
            x, positions, None, deterministic, None, cache[i])
      return self._logits(embed, x), tuple(cache)
    if targets is not None:
      return self.layers_and_loss(embed, x, positions, deterministic, targets, loss_mask)
    x = self.layer_stack(x, positions, deterministic, random_ltd_kept, layer_keep_theta)
    if features_only:
      return LayerNorm(cfg.layernorm_eps, name="ln_final")(x)
    return self._logits(embed, x)

  def layer_stack(self, x: jax.Array, positions: jax.Array, deterministic: bool,
                  random_ltd_kept: int | None, layer_keep_theta: jax.Array | None) -> jax.Array:
    """The L blocks: x [B, S, d_model] -> [B, S, d_model]; see ``__call__``'s arguments."""
    cfg = self.config
    block = remat_block(cfg, self.is_initializing())

    def make_layer(i: int, per_row_positions: bool) -> nn.Module:
      return block(cfg, causal=True, pre_ln=True, per_row_positions=per_row_positions,
                   feed_forward=None if cfg.moe is None else cfg.moe.feed_forward_at(i),
                   name=f"layer_{i}")

    # Sorted kept tokens keep the causal order: their mask is the r x r triangle.
    mask_for = lambda idx: causal_mask(positions.shape[1] if idx is None else idx.shape[1])
    return run_layers(self, make_layer, cfg.num_layers, x, positions, mask_for, deterministic,
                      random_ltd_kept, layer_keep_theta)

  def layers_and_loss(self, embed: Embed, x: jax.Array, positions: jax.Array,
                      deterministic: bool, targets: jax.Array,
                      loss_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """The L blocks, the head and the loss: (summed cross-entropy, counted tokens)."""
    x = self.layer_stack(x, positions, deterministic, None, None)
    return cross_entropy(self._logits(embed, x), targets, loss_mask)

  def _logits(self, embed: Embed, x: jax.Array) -> jax.Array:
    """Final LayerNorm and LM head: [B, S, d_model] -> float32 logits [B, S, vocab]."""
    cfg = self.config
    x = LayerNorm(cfg.layernorm_eps, name="ln_final")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      w = self.param("lm_head", param_init(("embed", "vocab")), (cfg.d_model, cfg.vocab_size))
      logits = constrain(x @ w.astype(cfg.compute_dtype), ("batch", "seq", "vocab"))
    return logits.astype(jnp.float32)

