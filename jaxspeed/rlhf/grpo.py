"""GRPO (Shao et al. 2024): PPO without a critic, advantages relative to a group of answers.

Each prompt is answered ``group_size`` times; every token of an answer gets
the answer's reward standardized within its group; the loss is PPO's clipped
surrogate plus β times the k3 estimate of KL(π‖π_ref) on every answer token.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxspeed.inference import SamplingConfig
from jaxspeed.models.gpt import GPT
from jaxspeed.rlhf.forward import policy_logprobs, sequence_score
from jaxspeed.rlhf.hybrid_engine import HybridEngine
from jaxspeed.rlhf.learner import Learner, like_batch, mesh_jit
from jaxspeed.rlhf.losses import group_advantages, k3_kl, policy_loss
from jaxspeed.rlhf.ppo import answer_mask
from jaxspeed.rlhf.value_model import ValueModel
from jaxspeed.training.state import TrainState


def grpo_loss_sum(model: GPT, cliprange: float, beta: float) -> Callable:
  """Σ over answer tokens of the clipped surrogate + β·k3 KL, counted per token."""
  def loss_sum(params, batch, rngs, deterministic, step=None, **_):
    del step
    tokens, mask = batch["inputs"], batch["action_mask"]
    logp = policy_logprobs(model, params, tokens, deterministic=deterministic, rngs=rngs)
    losses = (policy_loss(logp, batch["old_logprobs"], batch["advantages"], cliprange)
              + beta * k3_kl(logp, batch["ref_logprobs"]))
    total = jnp.sum(losses * mask)
    return total, {"loss_sum": total, "tokens": jnp.sum(mask)}
  return loss_sum


def make_group_experience_fn(actor: GPT, reward: ValueModel, mesh, group_size: int) -> Callable:
  """``experience(actor, ref, reward params, tokens, mask)`` -> (arrays [B, S], stats)."""
  def experience(actor_params, ref_params, reward_params, tokens, mask):
    logprobs = policy_logprobs(actor, actor_params, tokens)
    ref_logprobs = policy_logprobs(actor, ref_params, tokens)
    score = sequence_score(reward, reward_params, tokens, jnp.ones_like(mask))
    advantages = group_advantages(score, group_size)[:, None] * mask
    arrays = dict(old_logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask,
                  advantages=advantages)
    stats = dict(score=jnp.mean(score),
                 kl=jnp.mean(jnp.sum((logprobs - ref_logprobs) * mask, axis=1)))
    return like_batch(arrays, mesh), stats
  return mesh_jit(experience, mesh)


@dataclasses.dataclass
class GrpoTrainer:
  """A GRPO run: ``iteration(i)`` samples ``group_size`` answers per prompt and learns."""

  actor: Learner
  actor_state: TrainState
  ref_params: object
  reward_model: ValueModel
  reward_params: object
  engine: HybridEngine
  grpo: ml_collections.ConfigDict
  prompts_at: Callable[[int], np.ndarray]
  answer_len: int
  temperature: float = 1.0
  seed: int = 0

  def __post_init__(self):
    self.experience = make_group_experience_fn(self.actor.model, self.reward_model,
                                               self.actor.mesh, self.grpo.group_size)
    self.train_seconds = 0.0

  def iteration(self, i: int) -> dict[str, float]:
    prompts = np.repeat(self.prompts_at(i), self.grpo.group_size, axis=0)
    tokens = self.engine.generate(self.actor_state.params, prompts, self.answer_len,
                                  SamplingConfig(temperature=self.temperature),
                                  seed=self.seed * 100003 + i)
    start = time.perf_counter()
    placed = self.actor.to_device({"inputs": tokens,
                                   "action_mask": answer_mask(*tokens.shape, prompts.shape[1])})
    arrays, stats = self.experience(self.actor_state.params, self.ref_params,
                                    self.reward_params, placed["inputs"], placed["action_mask"])
    self.actor_state, metrics = self.actor.train_step(self.actor_state, {**placed, **arrays}, i)
    self.train_seconds += time.perf_counter() - start
    return {"iteration": i + 1, **{k: float(v) for k, v in stats.items()},
            "loss": float(metrics["loss"])}
