"""DPO (Rafailov et al. 2023): the preference pairs optimize the actor directly, no reward model."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxspeed.models.gpt import GPT
from jaxspeed.rlhf.data import PreferencePairs
from jaxspeed.rlhf.forward import policy_logprobs
from jaxspeed.rlhf.learner import like_batch, mesh_jit
from jaxspeed.rlhf.losses import dpo_loss
from jaxspeed.rlhf.ppo import answer_mask


def dpo_batch(pairs: PreferencePairs, rows: np.ndarray) -> dict:
  """``inputs`` (prompt + chosen), ``rejected`` [B, S] and the ``answer_mask`` [B, S]."""
  taken = pairs.take(rows)
  chosen = taken.sequences("chosen")
  return {"inputs": chosen, "rejected": taken.sequences("rejected"),
          "answer_mask": answer_mask(*chosen.shape, pairs.prompts.shape[1])}


def make_reference_logprobs(model: GPT, mesh) -> Callable:
  """``ref(params, batch) -> batch`` plus the reference's per-token log-probs of both answers."""
  def ref(params, batch):
    logp = lambda tokens: policy_logprobs(model, params, tokens) * batch["answer_mask"]
    return like_batch({**batch, "ref_chosen": logp(batch["inputs"]),
                       "ref_rejected": logp(batch["rejected"])}, mesh)
  return mesh_jit(ref, mesh)


def dpo_loss_sum(model: GPT, beta: float) -> Callable:
  """Σ over pairs of the DPO loss, counted per pair; answer log-probs summed over tokens."""
  def loss_sum(params, batch, rngs, deterministic, step=None, **_):
    del step
    mask = batch["answer_mask"]
    answer_logp = lambda tokens: jnp.sum(policy_logprobs(
        model, params, tokens, deterministic=deterministic, rngs=rngs) * mask, axis=1)
    losses = dpo_loss(answer_logp(batch["inputs"]), answer_logp(batch["rejected"]),
                      jnp.sum(batch["ref_chosen"], axis=1), jnp.sum(batch["ref_rejected"], axis=1),
                      beta)
    total = jnp.sum(losses)
    return total, {"loss_sum": total, "tokens": jnp.float32(losses.shape[0])}
  return loss_sum
