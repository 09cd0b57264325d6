"""Step 3: PPO with a frozen reference, a critic and a reward model (DeepSpeed-Chat).

One iteration: the hybrid engine samples answers from the actor; one jitted
pass computes the actor's and the reference's log-probabilities, the critic's
values, the reward model's score, the KL-penalized rewards and GAE; then
``ppo_epochs`` clipped updates of the actor and of the critic; then the EMA
of the actor. All four models live on the training mesh in their training
shardings; only the actor is also placed for generation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxspeed.inference import SamplingConfig
from jaxspeed.models.gpt import GPT
from jaxspeed.models.losses import cross_entropy
from jaxspeed.rlhf.forward import policy_logprobs, sequence_score
from jaxspeed.rlhf.hybrid_engine import HybridEngine
from jaxspeed.rlhf.learner import Learner, like_batch, mesh_jit
from jaxspeed.rlhf.losses import (
    AdaptiveKLController,
    ema_update,
    gae,
    kl_penalized_rewards,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from jaxspeed.rlhf.value_model import ValueModel
from jaxspeed.training.state import TrainState

PTX_INPUTS, PTX_TARGETS = "ptx_inputs", "ptx_targets"


def answer_mask(batch: int, seq_len: int, prompt_len: int) -> np.ndarray:
  """[B, S] float: 1 at the positions that predict answer tokens (t = P−1 .. S−2)."""
  t = np.arange(seq_len)
  return np.broadcast_to((t >= prompt_len - 1) & (t < seq_len - 1),
                         (batch, seq_len)).astype(np.float32)


def actor_loss_sum(model: GPT, cliprange: float, unsup_coef: float) -> Callable:
  """Clipped policy loss summed over actions; plus ``unsup_coef`` × the PTX LM loss (mean)."""
  def loss_sum(params, batch, rngs, deterministic, step=None, **_):
    del step
    tokens, mask = batch["inputs"], batch["action_mask"]
    logprobs = policy_logprobs(model, params, tokens, deterministic=deterministic, rngs=rngs)
    losses = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], cliprange)
    total, count = jnp.sum(losses * mask), jnp.sum(mask)
    objective = total
    if PTX_INPUTS in batch:
      logits = model.apply({"params": params}, batch[PTX_INPUTS], deterministic=deterministic,
                           rngs=rngs)
      ce, n = cross_entropy(logits, batch[PTX_TARGETS])
      objective = objective + unsup_coef * ce / n * count
    return objective, {"loss_sum": total, "tokens": count}
  return loss_sum


def critic_loss_sum(model: ValueModel, cliprange_value: float) -> Callable:
  """DeepSpeed-Chat's clipped value loss summed over actions."""
  def loss_sum(params, batch, rngs, deterministic, step=None, **_):
    del step
    values = model.apply({"params": params}, batch["inputs"], deterministic=deterministic,
                         rngs=rngs)
    losses = value_loss(values, batch["old_values"], batch["returns"], cliprange_value)
    total = jnp.sum(losses * batch["action_mask"])
    return total, {"loss_sum": total, "tokens": jnp.sum(batch["action_mask"])}
  return loss_sum


def make_experience_fn(actor: GPT, critic: ValueModel, reward: ValueModel, mesh,
                       ppo: ml_collections.ConfigDict) -> Callable:
  """``experience(actor, ref, critic, reward params, tokens, action_mask, kl_coef)``.

  Returns:
    (arrays [B, S]: old_logprobs, ref_logprobs, old_values, rewards,
    advantages, returns; scalars: mean ``score``, ``kl`` (mean over rows of
    Σ_t log π − log π_ref) and ``reward`` (mean of Σ_t rewards)).
  """
  def experience(actor_params, ref_params, critic_params, reward_params, tokens, mask,
                 kl_coef):
    logprobs = policy_logprobs(actor, actor_params, tokens)
    ref_logprobs = policy_logprobs(actor, ref_params, tokens)
    values = critic.apply({"params": critic_params}, tokens)
    score = sequence_score(reward, reward_params, tokens, jnp.ones_like(mask))
    rewards = kl_penalized_rewards(logprobs, ref_logprobs, score, mask, kl_coef,
                                   ppo.clip_reward_value)
    advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
    if ppo.whiten_advantages:
      advantages = whiten(advantages, mask)
    arrays = dict(old_logprobs=logprobs * mask, ref_logprobs=ref_logprobs * mask,
                  old_values=values * mask, rewards=rewards, advantages=advantages,
                  returns=returns)
    stats = dict(score=jnp.mean(score),
                 kl=jnp.mean(jnp.sum((logprobs - ref_logprobs) * mask, axis=1)),
                 reward=jnp.mean(jnp.sum(rewards, axis=1)))
    return like_batch(arrays, mesh), stats
  return mesh_jit(experience, mesh)


@dataclasses.dataclass
class PpoTrainer:
  """The state of a PPO run; ``iteration(i)`` does one generate-and-learn round.

  Attributes:
    actor, critic: their learners (train steps with the PPO objectives).
    actor_state, critic_state: their train states.
    ref_params, reward_params: the frozen SFT actor and reward model.
    engine: the hybrid engine generating from the actor.
    prompts_at: iteration -> prompts [B, P] (host int32).
    ptx_at: iteration -> a pretraining batch for the PTX term, or None.
  """

  actor: Learner
  critic: Learner
  actor_state: TrainState
  critic_state: TrainState
  ref_params: object
  reward_params: object
  engine: HybridEngine
  ppo: ml_collections.ConfigDict
  prompts_at: Callable[[int], np.ndarray]
  answer_len: int
  ptx_at: Callable[[int], dict] | None = None
  seed: int = 0

  def __post_init__(self):
    ppo = self.ppo
    self.experience = make_experience_fn(self.actor.model, self.critic.model,
                                         self.critic.model, self.actor.mesh, ppo)
    self.kl_control = (AdaptiveKLController(ppo.kl_ctl, ppo.kl_target, ppo.kl_horizon)
                       if ppo.adaptive_kl else None)
    self.kl_coef = ppo.kl_ctl
    self.sampling = SamplingConfig(temperature=ppo.temperature, top_k=ppo.top_k)
    self.ema_params = None
    if ppo.enable_ema:
      self._ema_update = jax.jit(lambda e, p: ema_update(e, p, ppo.ema_beta), donate_argnums=0)
      self.ema_params = jax.tree.map(jnp.copy, self.actor_state.params)
    self.train_seconds = 0.0

  def iteration(self, i: int) -> dict[str, float]:
    """Generates one batch of answers and learns from it; returns the iteration's metrics."""
    prompts = self.prompts_at(i)
    generated_before = self.engine.generate_seconds
    tokens = self.engine.generate(self.actor_state.params, prompts, self.answer_len,
                                  self.sampling, seed=self.seed * 100003 + i)
    start = time.perf_counter()
    mask = answer_mask(*tokens.shape, prompts.shape[1])
    placed = self.actor.to_device({"inputs": tokens, "action_mask": mask})
    arrays, stats = self.experience(self.actor_state.params, self.ref_params,
                                    self.critic_state.params, self.reward_params,
                                    placed["inputs"], placed["action_mask"],
                                    jnp.float32(self.kl_coef))
    actor_batch = dict(placed, old_logprobs=arrays["old_logprobs"],
                       advantages=arrays["advantages"])
    if self.ptx_at is not None:
      actor_batch.update(self.actor.to_device(self.ptx_at(i)))
    critic_batch = dict(placed, old_values=arrays["old_values"], returns=arrays["returns"])
    for epoch in range(self.ppo.ppo_epochs):
      step = i * self.ppo.ppo_epochs + epoch
      self.actor_state, actor_metrics = self.actor.train_step(self.actor_state, actor_batch, step)
      self.critic_state, critic_metrics = self.critic.train_step(self.critic_state,
                                                                 critic_batch, step)
    if self.ema_params is not None:
      self.ema_params = self._ema_update(self.ema_params, self.actor_state.params)
    record = {"iteration": i + 1, **{k: float(v) for k, v in stats.items()},
              "actor_loss": float(actor_metrics["loss"]),
              "critic_loss": float(critic_metrics["loss"]), "kl_coef": self.kl_coef,
              "advantage_mean": float(masked_mean(arrays["advantages"], placed["action_mask"]))}
    if self.kl_control is not None:
      self.kl_coef = self.kl_control.update(record["kl"], len(prompts))
    record["train_s"] = time.perf_counter() - start
    record["generate_s"] = self.engine.generate_seconds - generated_before
    self.train_seconds += record["train_s"]
    return record
