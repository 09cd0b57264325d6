"""A small Vision Transformer (Dosovitskiy et al. 2021): the image encoder of multi-modal chat.

An image [H, W, C] is cut into non-overlapping P x P patches, each flattened and
projected to d_model (the patch embedding, Eq. 1), a learned [CLS] token is
prepended and learned position embeddings added; then pre-LN blocks, the GPT's
``Block`` without the causal mask, and a final LayerNorm. Parameters carry the
same logical axes as the GPT's, so the encoder shards by the same rules.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from jaxspeed.models.config import ModelConfig
from jaxspeed.models.layers import Block, LayerNorm, constrain, param_init, zeros_init


def num_patches(image_size: int, patch_size: int) -> int:
  """Patches of a square image: (image_size / patch_size)²."""
  return (image_size // patch_size) ** 2


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/P)·(W/P), P·P·C]: patches in row-major order, each flattened
  row by row (Eq. 1's x_p)."""
  return rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


class VisionTransformer(nn.Module):
  """``__call__(images [B, H, W, C]) -> features [B, 1 + N, d_model]`` ([CLS] first, then the
  N = (H / P)·(W / P) patches in row-major order), after the final LayerNorm.

  ``config`` sizes the blocks (``d_model``, ``num_heads``, ``d_ff``, ``num_layers``);
  its ``position`` must be ``learned`` (the encoder adds its own 2-D-agnostic table).
  With ``num_classes`` > 0, ``classify`` maps the [CLS] feature to class logits.
  """

  config: ModelConfig
  image_size: int
  patch_size: int
  channels: int = 1
  num_classes: int = 0

  def setup(self):
    cfg = self.config
    patch_dim = self.patch_size ** 2 * self.channels
    self.patch_embed = self.param("patch_embed", param_init((None, "embed")),
                                  (patch_dim, cfg.d_model))
    self.cls = self.param("cls", param_init((None, None, "embed")), (1, 1, cfg.d_model))
    self.pos_embed = self.param(
        "pos_embed", param_init((None, "embed")),
        (1 + num_patches(self.image_size, self.patch_size), cfg.d_model))
    self.blocks = [Block(cfg, causal=False, pre_ln=True, name=f"layer_{i}")
                   for i in range(cfg.num_layers)]
    self.ln_final = LayerNorm(cfg.layernorm_eps)
    if self.num_classes:
      self.head = self.param("head", param_init(("embed", None)), (cfg.d_model, self.num_classes))
      self.head_bias = self.param("head_bias", zeros_init((None,)), (self.num_classes,))

  def __call__(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    if images.shape[1:] != (self.image_size, self.image_size, self.channels):
      raise ValueError(f"images of shape {images.shape[1:]}; the encoder takes "
                       f"{(self.image_size, self.image_size, self.channels)}")
    dtype = self.config.compute_dtype
    x = patchify(images, self.patch_size).astype(dtype) @ self.patch_embed.astype(dtype)
    cls = jnp.broadcast_to(self.cls.astype(dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.astype(dtype)
    x = constrain(x, ("batch", "seq", "embed"))
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    for block in self.blocks:
      x = block(x, positions, None, deterministic)
    return self.ln_final(x)

  def classify(self, images: jax.Array, deterministic: bool = True) -> jax.Array:
    """images [B, H, W, C] -> float32 class logits [B, num_classes] from the [CLS] feature."""
    features = self(images, deterministic)[:, 0]
    return (features @ self.head.astype(features.dtype)).astype(jnp.float32) + self.head_bias
