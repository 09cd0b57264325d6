"""Attention over interleaved image and text tokens: plain causal, and DeepSpeed-VisualChat's
multi-modal causal attention (MMCA; Yao et al. 2023, arXiv 2309.14327, §3).

A sequence's tokens are typed by ``segments`` [B, S] int: ``TEXT`` (0) for a text
token, n >= 1 for a token of the sequence's n-th image, ``PAD`` (-1) for padding.

* ``causal``: one softmax over every earlier token, text or image.
* ``mmca``: two softmaxes, each normalized on its own, their outputs summed:
  - a text query attends to earlier text tokens with one softmax and to the
    image tokens before it with the other;
  - an image query attends only to the tokens of its own image (all of them:
    an image's tokens are one set of encoder features, prefilled together).
  A branch with no allowed key contributes zero. DeepSpeed-VisualChat's code
  instead lets such a row average over masked keys, which for text before the
  first image leaks the later image tokens; and it also lets image queries
  attend to earlier text. Both are left out here, following the paper's text.

The branches run through any attention implementation of
``jaxspeed.models.attention`` (``mask`` argument), so MMCA costs two attention
passes over the same scores' shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxspeed.models.attention import AttentionFn

TEXT = 0
PAD = -1
VARIANTS = ("causal", "mmca")


def _earlier(segments: jax.Array) -> jax.Array:
  """[B, 1, S, S]: key position <= query position."""
  positions = jnp.arange(segments.shape[1])
  return (positions[None, :] <= positions[:, None])[None, None]


def causal_mixed_mask(segments: jax.Array) -> jax.Array:
  """Plain causal attention over the mixed sequence, padding excluded as keys: [B, 1, S, S]."""
  return _earlier(segments) & (segments != PAD)[:, None, None, :]


def mmca_masks(segments: jax.Array) -> tuple[jax.Array, jax.Array]:
  """MMCA's two masks from ``segments`` [B, S]: (text branch, image branch), each
  [B, 1, S, S] boolean, True where query s may attend to key t."""
  query, key = segments[:, None, :, None], segments[:, None, None, :]
  earlier = _earlier(segments)
  text_branch = earlier & (query == TEXT) & (key == TEXT)
  image_branch = ((query == TEXT) & (key > TEXT) & earlier) | ((query > TEXT) & (key == query))
  return text_branch, image_branch


def mmca_attention(attend: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array,
                   segments: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """MMCA: Σ over the two branches of softmax(q kᵀ/√d + bias | branch mask) v.

  Args:
    attend: an attention implementation (``jaxspeed.models.attention.get_attention``).
    q: [B, S, H, D]; k, v: [B, S, H, D] (self-attention over the mixed sequence).
    segments: [B, S] token types (module docstring).
    bias: additive logits bias broadcastable to [B, H, S, S] (e.g. ALiBi), or None.

  Returns:
    [B, S, H, D] in q's dtype; zero for a query whose branches both have no key (padding).
  """
  out = jnp.zeros_like(q)
  for mask in mmca_masks(segments):
    # A row with no allowed key would come out as an average over masked keys: zero it.
    has_keys = jnp.swapaxes(mask.any(axis=-1, keepdims=True), 1, 2)  # [B, S, 1, 1]
    out = out + jnp.where(has_keys, attend(q, k, v, bias=bias, mask=mask), 0).astype(q.dtype)
  return out
