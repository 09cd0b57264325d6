"""The language-model loss: token cross-entropy that keeps a vocabulary-split ``logits`` split."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy [B, S], written so a vocab-split ``logits`` stays split.

  The target logit is picked with a masked sum instead of a gather, so under
  tensor parallelism each device reduces its own vocabulary slice and XLA adds
  one all-reduce of [B, S] values (Megatron's vocab-parallel cross-entropy).

  Args:
    logits: [B, S, V] float32.
    targets: [B, S] int.
  """
  vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  target_logit = jnp.sum(jnp.where(vocab_ids == targets[..., None], logits, 0.0), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Summed token cross-entropy (``token_cross_entropy``) over the counted tokens.

  Args:
    logits: [B, S, V] float32.
    targets: [B, S] int.
    mask: [B, S], 1 where the token counts; all ones if None.

  Returns:
    (sum of losses over counted tokens, number of counted tokens).
  """
  losses = token_cross_entropy(logits, targets)
  mask = jnp.ones_like(losses) if mask is None else mask.astype(losses.dtype)
  return jnp.sum(losses * mask), jnp.sum(mask)
