"""Mixture-of-Students (MoS) knowledge distillation (DeepSpeed-MoE §5; Megatron-DeepSpeed ``--kd``).

A student with fewer layers learns from a trained MoE teacher with

  loss = α · CE + coef · Σ l_aux + β · T² · KL(softmax(t/T) ‖ softmax(s/T)) / tokens

(reference §7, MoS: Megatron's ``kl_div(..., reduction="batchmean") / seq_len``,
that is the KL averaged over tokens). Staged KD stops the KL term after
``stop_step`` and continues with the plain LM loss. The train step's
objective is ``jaxspeed.training.step.KnowledgeDistillation``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# The batch key under which ``jaxspeed.training.step.KnowledgeDistillation`` hands the
# teacher's logits [B, S, V] to its loss, so they split with the batch into microbatches.
TEACHER_LOGITS = "teacher_logits"


@dataclasses.dataclass(frozen=True)
class Distillation:
  """Megatron-DeepSpeed's ``--kd-temp``, ``--kd-alpha-ce``, ``--kd-beta-ce``."""

  temperature: float = 1.0
  alpha_ce: float = 1.0
  beta_ce: float = 1.0


def kd_loss_sum(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
                mask: jax.Array | None = None) -> jax.Array:
  """Σ over counted tokens of T² · KL(softmax(t/T) ‖ softmax(s/T)).

  Args:
    student_logits, teacher_logits: [B, S, V].
    temperature: T.
    mask: [B, S], 1 where the token counts; all ones if None.
  """
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  mask = jnp.ones_like(kl) if mask is None else mask.astype(kl.dtype)
  return temperature**2 * jnp.sum(kl * mask)
