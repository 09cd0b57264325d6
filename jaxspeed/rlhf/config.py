"""``config.rlhf``: DeepSpeed-Chat's three steps, DPO and GRPO (``experiments.rlhf``).

Model, mesh, ZeRO stage and optimizer come from the rest of the config, as
for pre-training; each step sets its own length, batch and learning rate.
DeepSpeed-Chat's defaults are kept where they carry over (KL 0.1, reward
clip 5, clip ranges 0.2, γ 1, λ 0.95, EMA 0.992, one PPO epoch); its
learning rates (actor 9.65e-6, critic 5e-6) are for OPT-1.3B and far too
small for a model trained from scratch in minutes.
"""

from __future__ import annotations

import dataclasses

from jaxspeed.errors import ConfigError
from jaxspeed.schema import Section, setting


@dataclasses.dataclass(frozen=True)
class SftConfig(Section):
  """Step 1, supervised fine-tuning; DeepSpeed-Chat trains on the prompt tokens too."""

  KEY = "rlhf.sft"

  steps: int = setting(200, ge=1)
  batch_size: int = setting(32, ge=1)
  learning_rate: float = setting(1e-3, gt=0)
  warmup: int = setting(10, ge=0)
  prompt_mask: bool = setting(False)


@dataclasses.dataclass(frozen=True)
class RewardConfig(Section):
  """Step 2, the reward model on preference pairs."""

  KEY = "rlhf.reward"

  steps: int = setting(500, ge=1)
  batch_size: int = setting(32, ge=1)
  learning_rate: float = setting(1e-3, gt=0)
  warmup: int = setting(20, ge=0)


@dataclasses.dataclass(frozen=True)
class PpoConfig(Section):
  """Step 3, PPO with a critic and an EMA actor.

  Attributes:
    temperature, top_k: sampling of the answers.
    whiten_advantages: not in DeepSpeed-Chat.
    adaptive_kl, kl_target, kl_horizon: Ziegler et al.'s KL controller; not in
      DeepSpeed-Chat.
    unsup_coef: PTX mix; DeepSpeed-Chat uses 27.8 when a pretraining set is given.
  """

  KEY = "rlhf.ppo"

  iterations: int = setting(60, ge=1)
  batch_size: int = setting(32, ge=1)
  ppo_epochs: int = setting(1, ge=1)
  actor_learning_rate: float = setting(1e-4, gt=0)
  critic_learning_rate: float = setting(1e-4, gt=0)
  warmup: int = setting(0, ge=0)
  kl_ctl: float = setting(0.1, ge=0)
  clip_reward_value: float = setting(5.0, gt=0)
  cliprange: float = setting(0.2, ge=0)
  cliprange_value: float = setting(0.2, ge=0)
  gamma: float = setting(1.0, ge=0, le=1)
  lam: float = setting(0.95, ge=0, le=1)
  temperature: float = setting(1.0, ge=0)
  top_k: int = setting(0, ge=0)
  whiten_advantages: bool = setting(False)
  adaptive_kl: bool = setting(False)
  kl_target: float = setting(6.0, gt=0)
  kl_horizon: int = setting(10000, ge=1)
  unsup_coef: float = setting(0.0, ge=0)
  enable_ema: bool = setting(True)
  ema_beta: float = setting(0.992, ge=0, le=1)


@dataclasses.dataclass(frozen=True)
class DpoConfig(Section):
  """Direct preference optimization (Rafailov et al. 2023)."""

  KEY = "rlhf.dpo"

  steps: int = setting(100, ge=1)
  batch_size: int = setting(32, ge=1)
  learning_rate: float = setting(1e-4, gt=0)
  warmup: int = setting(0, ge=0)
  beta: float = setting(0.1, gt=0)


@dataclasses.dataclass(frozen=True)
class GrpoConfig(Section):
  """Group relative policy optimization (Shao et al. 2024): ``group_size`` answers per prompt."""

  KEY = "rlhf.grpo"

  iterations: int = setting(60, ge=1)
  prompts: int = setting(8, ge=1)
  group_size: int = setting(4, ge=1)
  learning_rate: float = setting(1e-4, gt=0)
  warmup: int = setting(0, ge=0)
  beta: float = setting(0.04, ge=0)
  cliprange: float = setting(0.2, ge=0)
  temperature: float = setting(1.0, ge=0)

  def check(self) -> None:
    if self.group_size < 2:
      raise ConfigError("rlhf.grpo.group_size", "GRPO compares answers within a group: need "
                        f">= 2, got {self.group_size}")


@dataclasses.dataclass(frozen=True)
class RlhfConfig(Section):
  """Attributes:
    prompt_len: tokens; the task's prompts are windows of real text.
    answer_len: DeepSpeed-Chat's ``max_answer_seq_len``.
    num_pairs, eval_pairs: training pairs (from data.corpus's train split) and
      held-out pairs (from the validation split).
    rejected: how rejected answers are corrupted (``jaxspeed.rlhf.data``).
    init_workdir, actor_workdir, reward_workdir: where each step finds its
      input; "" means <workdir>/pretrain, /sft and /reward.
  """

  KEY = "rlhf"

  prompt_len: int = setting(48, ge=1)
  answer_len: int = setting(24, ge=1)
  num_pairs: int = setting(4096, ge=1)
  eval_pairs: int = setting(256, ge=1)
  rejected: str = setting("shuffle,swap")
  init_workdir: str = setting("")
  actor_workdir: str = setting("")
  reward_workdir: str = setting("")
  sft: SftConfig = setting(factory=SftConfig)
  reward: RewardConfig = setting(factory=RewardConfig)
  ppo: PpoConfig = setting(factory=PpoConfig)
  dpo: DpoConfig = setting(factory=DpoConfig)
  grpo: GrpoConfig = setting(factory=GrpoConfig)
