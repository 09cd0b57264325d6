"""RLHF (DeepSpeed-Chat, Yao et al. 2023): SFT, pairwise reward model, PPO; DPO and GRPO.

``pipeline`` runs the steps from one config (``experiments.rlhf``); the
pieces are usable alone: the losses are pure functions, ``ValueModel`` is the
reward model / critic, ``Learner`` the train step of one model on the mesh,
``HybridEngine`` the actor's switch between training and generation.
"""

from jaxspeed.rlhf.data import REJECTION_KINDS, PreferencePairs, continuation_pairs
from jaxspeed.rlhf.grpo import GrpoTrainer
from jaxspeed.rlhf.hybrid_engine import HybridEngine
from jaxspeed.rlhf.learner import Learner, fit, make_learner, mesh_jit
from jaxspeed.rlhf.losses import (
    AdaptiveKLController,
    dpo_loss,
    ema_update,
    gae,
    group_advantages,
    k3_kl,
    kl_penalized_rewards,
    last_token_value,
    masked_mean,
    pairwise_region,
    pairwise_reward_loss,
    policy_loss,
    token_logprobs,
    value_loss,
    whiten,
)
from jaxspeed.rlhf.pipeline import STEPS, Context, make_context
from jaxspeed.rlhf.ppo import PpoTrainer
from jaxspeed.rlhf.value_model import ValueModel, value_params_from_lm

__all__ = [
    "REJECTION_KINDS",
    "STEPS",
    "AdaptiveKLController",
    "Context",
    "GrpoTrainer",
    "HybridEngine",
    "Learner",
    "PpoTrainer",
    "PreferencePairs",
    "ValueModel",
    "continuation_pairs",
    "dpo_loss",
    "ema_update",
    "fit",
    "gae",
    "group_advantages",
    "k3_kl",
    "kl_penalized_rewards",
    "last_token_value",
    "make_context",
    "make_learner",
    "masked_mean",
    "mesh_jit",
    "pairwise_region",
    "pairwise_reward_loss",
    "policy_loss",
    "token_logprobs",
    "value_loss",
    "value_params_from_lm",
    "whiten",
]
