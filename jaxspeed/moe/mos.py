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

from jaxspeed.errors import ConfigError
from jaxspeed.schema import Section, setting

# The batch key under which ``jaxspeed.training.step.KnowledgeDistillation`` hands the
# teacher's logits [B, S, V] to its loss, so they split with the batch into microbatches.
TEACHER_LOGITS = "teacher_logits"


@dataclasses.dataclass(frozen=True)
class Distillation:
  """Megatron-DeepSpeed's ``--kd-temp``, ``--kd-alpha-ce``, ``--kd-beta-ce``."""

  temperature: float = 1.0
  alpha_ce: float = 1.0
  beta_ce: float = 1.0


@dataclasses.dataclass(frozen=True)
class KdConfig(Section):
  """``config.kd``: MoS distillation from a trained teacher (Megatron-DeepSpeed ``--kd``).

  Attributes:
    teacher_workdir: ``--load-teacher``, a finished run's workdir (its checkpoints).
    num_layers_teacher: 0 means the student's ``model.num_layers``.
    num_experts_teacher: the teacher's ``moe.layer_num_experts``; empty: the student's.
    temperature, alpha_ce, beta_ce: ``--kd-temp``, ``--kd-alpha-ce``, ``--kd-beta-ce``.
    stop_step: staged KD, the plain LM loss from this step on; 0 distills throughout.
  """

  KEY = "kd"

  enabled: bool = setting(False)
  teacher_workdir: str = setting("")
  num_layers_teacher: int = setting(0, ge=0)
  num_experts_teacher: tuple[int, ...] = setting(())
  temperature: float = setting(1.0, gt=0)
  alpha_ce: float = setting(1.0, ge=0)
  beta_ce: float = setting(1.0, ge=0)
  stop_step: int = setting(0, ge=0)

  def check(self) -> None:
    if self.enabled and not self.teacher_workdir:
      raise ConfigError("kd.teacher_workdir", "distillation needs the workdir of a trained "
                        "teacher")

  @property
  def distillation(self) -> Distillation:
    return Distillation(self.temperature, self.alpha_ce, self.beta_ce)


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
