"""Top-1, top-2 and top-k gates of DeepSpeed-MoE, as pure functions of one token group.

A gate maps the fp32 router logits of S tokens over E experts to, for each
token, k chosen experts, their combine weights and capacity slots. The rules
follow DeepSpeed's ``sharded_moe.py`` as summarized in
``reference/deepspeed-algorithms.md`` §7(b):

* capacity C = max(⌈S/E · cf · k⌉, min_capacity) (``capacity``);
* top-1: expert = argmax(softmax(logits)) (argmax(logits + Gumbel) under
  RSample, noise for selection only); combine weight = the raw gate
  probability, **not** renormalized; aux = E · Σ_e mean_s(gates_e) ·
  mean_s(mask1_e); with random token selection (RTS) each expert keeps the C
  tokens of highest priority mask1 ⊙ U(0, 1) instead of the first C;
* top-2: 2nd = argmax over the other experts of logits (+ Gumbel when
  sampled); 2nd-choice slots start after all 1st choices; drops by position;
  aux = mean_e(me · ce) · E² with ce from the first choice only; weights
  renormalized g_i / (g1 + g2) over the kept choices;
* top-k (k > 2): the k largest gates; aux = mean_e(me · ce) · E² / k with ce
  over all k choices; drops by position or by probability (``drop_policy``);
  weights renormalized over the kept choices.

Slots are assigned in token order among the kept tokens (cumsum − 1), so a
capacity above S is harmless (DeepSpeed PR #8155 crashed there: it took a
top-C over the token dimension). With ``capacity=None`` (dropless) nothing is
dropped and no slot is assigned.

Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2): a
per-expert ``bias`` [E] is added to the scores a gate selects by (the softmax
probabilities, or logits + Gumbel noise where a choice is sampled) for the
choice only; combine weights, capacity ranks and the aux loss read the
unbiased probabilities. ``jaxspeed.moe.balancing`` moves the bias.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DROP_POLICIES = ("probs", "position")
_EPS = float(jnp.finfo(jnp.float32).eps)


class Routing(NamedTuple):
  """Where the S tokens of one group go.

  Attributes:
    experts: [S, k] int32, the chosen experts, first choice first.
    weights: [S, k] float32 combine weights; 0 where the choice was dropped.
    slots: [S, k] int32 capacity slot of each kept choice (0 where dropped).
    kept: [S, k] bool, False where the expert was full.
    aux_loss: [] float32 load-balancing loss (unscaled by ``aux_loss_coef``).
    counts: [E] int32 tokens routed to each expert over all k choices, before
      capacity (DeepSpeed's ``exp_counts``).
  """

  experts: jax.Array
  weights: jax.Array
  slots: jax.Array
  kept: jax.Array
  aux_loss: jax.Array
  counts: jax.Array

  @property
  def dropped(self) -> jax.Array:
    """[] int32 token-expert assignments dropped for lack of capacity."""
    return jnp.sum(~self.kept).astype(jnp.int32)


def capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int,
             k: int = 1) -> int:
  """C = max(⌈S/E · cf · k⌉, min_capacity), a static int (DeepSpeed ``_capacity``)."""
  return max(math.ceil(num_tokens / num_experts * capacity_factor * k), min_capacity)


def _positions(mask: jax.Array) -> jax.Array:
  """[S, E] 0/1 → each token's 0-based rank among the tokens of its expert, in token order."""
  return jnp.cumsum(mask, axis=0) - 1


def _rank_by_priority(mask: jax.Array, priority: jax.Array) -> jax.Array:
  """[S, E] 0/1, [S, E] → rank of each token within its expert by decreasing priority.

  A double argsort instead of DeepSpeed's ``topk(.., k=C, dim=0)``, so that C
  may exceed S.
  """
  order = jnp.argsort(-jnp.where(mask > 0, priority, -1.0), axis=0, stable=True)
  return jnp.argsort(order, axis=0, stable=True)


def _one_hot(indices: jax.Array, num_experts: int) -> jax.Array:
  return jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)


def _biased(scores: jax.Array, bias: jax.Array | None) -> jax.Array:
  """[S, E] selection scores plus the routing bias [E] (for the choice only), if any."""
  return scores if bias is None else scores + bias.astype(scores.dtype)


def top1_gating(logits: jax.Array, capacity: int | None, *, rts_noise: jax.Array | None = None,
                selection_noise: jax.Array | None = None,
                bias: jax.Array | None = None) -> Routing:
  """DeepSpeed's ``top1gating`` for one group.

  Args:
    logits: [S, E] float32 router logits.
    capacity: C, or None for dropless.
    rts_noise: [S, E] U(0, 1) draws for random token selection, or None to
      keep the first C tokens of each expert, in token order. DeepSpeed
      without RTS takes ``topk`` of the 0/1 mask over tokens, where every
      routed token ties, so which C it keeps is up to the tie order of
      ``torch.topk`` (not promised to be the first C); the two agree on how
      many tokens each expert keeps and on the weights, not on which tokens.
    selection_noise: [S, E] Gumbel noise added to the logits for the choice
      only (RSample), or None.
    bias: [E] routing bias added to the selection scores, or None.
  """
  num_experts = logits.shape[-1]
  gates = jax.nn.softmax(logits, axis=-1)
  scores = gates if selection_noise is None else logits + selection_noise
  expert = jnp.argmax(_biased(scores, bias), axis=-1)
  mask = _one_hot(expert, num_experts)
  aux = num_experts * jnp.sum(jnp.mean(gates, axis=0) * jnp.mean(mask, axis=0))
  counts = jnp.sum(mask, axis=0)
  if capacity is None:
    kept = jnp.ones_like(expert, dtype=bool)
  else:
    rank = (_positions(mask) if rts_noise is None
            else _rank_by_priority(mask, rts_noise))
    kept = jnp.sum(mask * (rank < capacity), axis=-1) > 0
  slot = jnp.sum(_positions(mask * kept[:, None]) * mask, axis=-1)
  weight = jnp.take_along_axis(gates, expert[:, None], axis=-1)[:, 0] * kept
  return Routing(expert[:, None].astype(jnp.int32), weight[:, None],
                 jnp.where(kept, slot, 0)[:, None].astype(jnp.int32), kept[:, None], aux,
                 counts.astype(jnp.int32))


def top2_gating(logits: jax.Array, capacity: int | None, *,
                selection_noise: jax.Array | None = None,
                bias: jax.Array | None = None) -> Routing:
  """DeepSpeed's ``top2gating`` for one group.

  Args:
    logits: [S, E] float32.
    capacity: C (already ×2 of the top-1 capacity), or None for dropless.
    selection_noise: [S, E] Gumbel noise for the second choice
      (``top2_2nd_expert_sampling``), or None.
    bias: [E] routing bias added to the selection scores, or None.
  """
  num_experts = logits.shape[-1]
  gates = jax.nn.softmax(logits, axis=-1)
  first = jnp.argmax(_biased(gates, bias), axis=-1)
  mask1 = _one_hot(first, num_experts)
  # Without noise the probabilities select (the same order as the logits, so that a bias
  # means the same for both choices).
  noisy = gates if selection_noise is None else logits + selection_noise
  second = jnp.argmax(jnp.where(mask1 > 0, -jnp.inf, _biased(noisy, bias)), axis=-1)
  mask2 = _one_hot(second, num_experts)
  # GShard's convention: only the first choice enters the balance term.
  aux = jnp.mean(jnp.mean(gates, axis=0) * jnp.mean(mask1, axis=0)) * num_experts**2
  counts = jnp.sum(mask1 + mask2, axis=0)
  # Second choices queue behind every first choice of the same expert.
  loc1 = jnp.sum(_positions(mask1) * mask1, axis=-1)
  loc2 = jnp.sum((_positions(mask2) + jnp.sum(mask1, axis=0)) * mask2, axis=-1)
  if capacity is None:
    kept1 = kept2 = jnp.ones_like(first, dtype=bool)
  else:
    kept1, kept2 = loc1 < capacity, loc2 < capacity
  g1 = jnp.take_along_axis(gates, first[:, None], axis=-1)[:, 0] * kept1
  g2 = jnp.take_along_axis(gates, second[:, None], axis=-1)[:, 0] * kept2
  denom = jnp.maximum(g1 + g2, _EPS)
  stack = lambda a, b: jnp.stack([a, b], axis=-1)
  kept = stack(kept1, kept2)
  return Routing(stack(first, second).astype(jnp.int32), stack(g1, g2) / denom[:, None],
                 jnp.where(kept, stack(loc1, loc2), 0).astype(jnp.int32), kept, aux,
                 counts.astype(jnp.int32))


def topk_gating(logits: jax.Array, k: int, capacity: int | None, *,
                drop_policy: str = "probs", bias: jax.Array | None = None) -> Routing:
  """DeepSpeed's ``topkgating`` for one group (any k; used for k > 2).

  Args:
    logits: [S, E] float32.
    k: experts per token.
    capacity: C (already ×k), or None for dropless.
    drop_policy: ``probs`` keeps each expert's C highest-probability tokens,
      ``position`` its first C tokens.
    bias: [E] routing bias added to the selection scores, or None.
  """
  num_experts = logits.shape[-1]
  gates = jax.nn.softmax(logits, axis=-1)
  _, experts = jax.lax.top_k(_biased(gates, bias), k)
  top_gates = jnp.take_along_axis(gates, experts, axis=-1)
  mask = jnp.sum(_one_hot(experts, num_experts), axis=1)  # [S, E] k-hot
  aux = jnp.mean(jnp.mean(gates, axis=0) * jnp.mean(mask, axis=0)) * num_experts**2 / k
  counts = jnp.sum(mask, axis=0)
  if capacity is None:
    kept_mask = mask
  else:
    rank = _positions(mask) if drop_policy == "position" else _rank_by_priority(mask, gates)
    kept_mask = mask * (rank < capacity)
  slots_e = _positions(kept_mask)  # [S, E] slot of each kept (token, expert)
  pick = lambda a: jnp.take_along_axis(a, experts, axis=-1)  # [S, E] -> [S, k]
  kept = pick(kept_mask) > 0
  weights = top_gates * kept
  weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), _EPS)
  return Routing(experts.astype(jnp.int32), weights,
                 jnp.where(kept, pick(slots_e), 0).astype(jnp.int32), kept, aux,
                 counts.astype(jnp.int32))


def route(logits: jax.Array, k: int, capacity: int | None, *, rts_noise: jax.Array | None = None,
          selection_noise: jax.Array | None = None, drop_policy: str = "probs",
          bias: jax.Array | None = None) -> Routing:
  """The gate of ``k``: ``top1_gating``, ``top2_gating`` or ``topk_gating``.

  RTS applies to top-1 only and selection noise to top-1 (RSample) and to the
  second choice of top-2, as in DeepSpeed; the routing ``bias`` to every choice.
  """
  if k == 1:
    return top1_gating(logits, capacity, rts_noise=rts_noise, selection_noise=selection_noise,
                       bias=bias)
  if k == 2:
    return top2_gating(logits, capacity, selection_noise=selection_noise, bias=bias)
  return topk_gating(logits, k, capacity, drop_policy=drop_policy, bias=bias)


def dispatch_and_combine(routing: Routing, num_experts: int,
                         capacity: int) -> tuple[jax.Array, jax.Array]:
  """Dense GShard tensors of a capacity routing.

  Returns:
    dispatch [S, E, C] bool (token s fills slot c of expert e) and combine
    [S, E, C] float32 (its combine weight there).
  """
  onehot = (jax.nn.one_hot(routing.experts, num_experts, dtype=jnp.float32)[..., None]
            * jax.nn.one_hot(routing.slots, capacity, dtype=jnp.float32)[..., None, :]
            * routing.kept[..., None, None])  # [S, k, E, C]
  combine = jnp.einsum("sk,skec->sec", routing.weights, onehot)
  return jnp.sum(onehot, axis=1) > 0, combine
