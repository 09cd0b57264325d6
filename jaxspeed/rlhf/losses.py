"""The RLHF objectives as pure functions of [B, S] arrays (DeepSpeed-Chat, Yao et al. 2023).

Layout shared by every function here: a row holds a prompt followed by an
answer. Per-token arrays are [B, S] and aligned with the *position that
predicts* a token: ``logprobs[:, t]`` is log π(tokens[t+1] | tokens[:t+1]),
``values[:, t]`` is the critic's value of the state ``tokens[:t+1]``, and
``action_mask[:, t]`` is 1 where tokens[t+1] is an answer token (an action).
The last column predicts nothing and is always masked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspeed.models.losses import token_cross_entropy


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ x·mask / Σ mask over all elements (DeepSpeed-Chat's ``masked_mean`` over the batch)."""
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """logits [B, S, V], tokens [B, S] -> [B, S]: log p(tokens[t+1]) at t, 0 in the last column."""
  targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
  logp = -token_cross_entropy(logits, targets)
  last = jnp.arange(tokens.shape[1]) == tokens.shape[1] - 1
  return jnp.where(last, 0.0, logp)


def last_token_value(values: jax.Array, mask: jax.Array) -> jax.Array:
  """values [B, S] at each row's last non-pad token (mask [B, S], right-padded) -> [B].

  DeepSpeed-Chat's reward score: the value head's output where the sequence ends.
  """
  last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]


# -- step 2: the pairwise reward-model loss -------------------------------------------------


def pairwise_region(chosen: jax.Array, rejected: jax.Array, chosen_mask: jax.Array,
                    rejected_mask: jax.Array) -> jax.Array:
  """[B, S] float: the positions the pairwise loss averages over, per pair.

  From the first position where the two sequences differ (in token or in
  padding) to the later of their ends; for identical sequences, the last
  position only (DeepSpeed-Chat's ``divergence_ind`` / ``end_ind``).
  """
  seq_len = chosen.shape[1]
  positions = jnp.arange(seq_len)
  differs = (chosen != rejected) | (chosen_mask != rejected_mask)
  any_diff = jnp.any(differs, axis=1)
  start = jnp.where(any_diff, jnp.argmax(differs, axis=1), seq_len - 1)
  end = jnp.where(any_diff, jnp.maximum(jnp.sum(chosen_mask, axis=1),
                                        jnp.sum(rejected_mask, axis=1)), seq_len)
  return ((positions >= start[:, None]) & (positions < end[:, None])).astype(jnp.float32)


def pairwise_reward_loss(chosen_values: jax.Array, rejected_values: jax.Array,
                         region: jax.Array) -> jax.Array:
  """Per-pair −log σ(r_c − r_r) averaged over ``region`` (``pairwise_region``): [B].

  Args:
    chosen_values, rejected_values: [B, S] per-token rewards of the value head.
    region: [B, S] float, nonzero in every row.
  """
  losses = -jax.nn.log_sigmoid(chosen_values - rejected_values)
  return jnp.sum(losses * region, axis=1) / jnp.sum(region, axis=1)


# -- step 3: PPO ----------------------------------------------------------------------------


def kl_penalized_rewards(logprobs: jax.Array, ref_logprobs: jax.Array, score: jax.Array,
                         action_mask: jax.Array, kl_coef: float | jax.Array,
                         clip_reward_value: float) -> jax.Array:
  """Per-token rewards [B, S]: −β·(log π − log π_ref) on actions, plus the clipped score.

  The reward-model score [B], clipped to ±``clip_reward_value``, is added at
  each row's last action; rewards are zero off the actions. (DeepSpeed-Chat
  adds it one position later, past the last action, when an answer ends
  before the maximum length; for full-length answers the two agree.)
  """
  rewards = -kl_coef * (logprobs - ref_logprobs) * action_mask
  positions = jnp.arange(action_mask.shape[1])
  last = jnp.max(jnp.where(action_mask > 0, positions, -1), axis=1)
  clipped = jnp.clip(score, -clip_reward_value, clip_reward_value)
  return rewards + jnp.where(positions == last[:, None], clipped[:, None], 0.0)


def gae(rewards: jax.Array, values: jax.Array, action_mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalized advantage estimation (Schulman et al. 2016, eq. 16) over the actions.

  δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with V and A zero
  past each row's last action, as DeepSpeed-Chat zeroes values after the end.

  Returns:
    (advantages, returns = advantages + values), each [B, S], zero off the actions.
  """
  values = values * action_mask
  next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
  next_mask = jnp.concatenate([action_mask[:, 1:], jnp.zeros_like(action_mask[:, :1])], axis=1)
  deltas = (rewards + gamma * next_values - values) * action_mask

  def backward(carry, xs):
    delta, m_next = xs
    advantage = delta + gamma * lam * m_next * carry
    return advantage, advantage

  _, advantages = jax.lax.scan(backward, jnp.zeros_like(deltas[:, 0]),
                               (deltas.T, next_mask.T), reverse=True)
  advantages = advantages.T * action_mask
  return advantages, (advantages + values) * action_mask


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x − mean) / std over the masked elements; zero off the mask."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(x - mean), mask)
  return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array,
                cliprange: float) -> jax.Array:
  """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), negated: [B, S].

  max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) with ρ = exp(log π − log π_old).
  """
  ratio = jnp.exp(logprobs - old_logprobs)
  return jnp.maximum(-advantages * ratio,
                     -advantages * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange))


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array,
               cliprange_value: float) -> jax.Array:
  """DeepSpeed-Chat's clipped critic loss per token: ½·max((v − R)², (clip(v, v_old ± ε) − R)²)."""
  clipped = jnp.clip(values, old_values - cliprange_value, old_values + cliprange_value)
  return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))


@dataclasses.dataclass
class AdaptiveKLController:
  """Ziegler et al. (2019), eq. 2: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon).

  DeepSpeed-Chat keeps β fixed; this is the option it lacks.
  """

  kl_coef: float
  target: float
  horizon: int

  def update(self, kl: float, batch_size: int) -> float:
    error = min(max(kl / self.target - 1.0, -0.2), 0.2)
    self.kl_coef *= 1.0 + error * batch_size / self.horizon
    return self.kl_coef


def ema_update(ema, params, beta: float):
  """ema ← β·ema + (1 − β)·params (DeepSpeed-Chat's ``moving_average``, a lerp)."""
  return jax.tree.map(lambda e, p: beta * e + (1.0 - beta) * p, ema, params)


# -- beyond DeepSpeed-Chat: DPO and GRPO -----------------------------------------------------


def dpo_loss(chosen_logp: jax.Array, rejected_logp: jax.Array, ref_chosen_logp: jax.Array,
             ref_rejected_logp: jax.Array, beta: float) -> jax.Array:
  """Direct preference optimization (Rafailov et al. 2023, eq. 7) per pair: [B].

  −log σ(β·[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))]),
  each log-probability summed over the answer's tokens.
  """
  margin = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
  return -jax.nn.log_sigmoid(beta * margin)


def group_advantages(scores: jax.Array, group_size: int, eps: float = 1e-4) -> jax.Array:
  """GRPO's advantage (Shao et al. 2024, §4.1.2): each score standardized within its group.

  Args:
    scores: [B] with B = groups × group_size, the answers to one prompt adjacent.

  Returns:
    [B]: (r − mean(group)) / (std(group) + eps), std over the group (ddof 0).
  """
  groups = scores.reshape(-1, group_size)
  normalized = (groups - groups.mean(axis=1, keepdims=True)) / (
      groups.std(axis=1, keepdims=True) + eps)
  return normalized.reshape(-1)


def k3_kl(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """Per-token unbiased KL(π‖π_ref) estimate exp(r) − r − 1, r = log π_ref − log π (GRPO eq. 4)."""
  log_ratio = ref_logprobs - logprobs
  return jnp.exp(log_ratio) - log_ratio - 1.0
