"""Step 2: the pairwise reward model (DeepSpeed-Chat's ``RewardModel``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxspeed.rlhf.data import PreferencePairs
from jaxspeed.rlhf.forward import sequence_score
from jaxspeed.rlhf.learner import mesh_jit
from jaxspeed.rlhf.losses import pairwise_region, pairwise_reward_loss
from jaxspeed.rlhf.value_model import ValueModel
from jaxspeed.training.step import batch_sharding


def reward_batch(pairs: PreferencePairs, rows: np.ndarray) -> dict:
  """``inputs`` (chosen) and ``rejected`` sequences [B, P + A] with their padding masks.

  Chosen and rejected stay in separate arrays, so a pair is never split
  between microbatches.
  """
  taken = pairs.take(rows)
  chosen, rejected = taken.sequences("chosen"), taken.sequences("rejected")
  ones = np.ones(chosen.shape, np.float32)
  return {"inputs": chosen, "rejected": rejected, "chosen_mask": ones, "rejected_mask": ones}


def reward_loss_sum(model: ValueModel) -> Callable:
  """The train-step objective: Σ over pairs of the pairwise loss, counted per pair."""
  def loss_sum(params, batch, rngs, deterministic, step=None, **_):
    del step
    values = lambda tokens: model.apply({"params": params}, tokens, deterministic=deterministic,
                                        rngs=rngs)
    region = pairwise_region(batch["inputs"], batch["rejected"], batch["chosen_mask"],
                             batch["rejected_mask"])
    losses = pairwise_reward_loss(values(batch["inputs"]), values(batch["rejected"]), region)
    total = jnp.sum(losses)
    return total, {"loss_sum": total, "tokens": jnp.float32(losses.shape[0])}
  return loss_sum


def make_scorer(model: ValueModel, mesh: Mesh) -> Callable:
  """``score(params, tokens [B, S], mask [B, S]) -> [B]``: the value at the last real token."""
  return mesh_jit(functools.partial(sequence_score, model), mesh)


def pairwise_accuracy(score: Callable, params, pairs: PreferencePairs, mesh: Mesh) -> dict:
  """Held-out accuracy (score(chosen) > score(rejected)) and mean scores of both sides."""
  batch = jax.device_put(reward_batch(pairs, np.arange(len(pairs))), batch_sharding(mesh))
  chosen = np.asarray(score(params, batch["inputs"], batch["chosen_mask"]))
  rejected = np.asarray(score(params, batch["rejected"], batch["rejected_mask"]))
  return {"accuracy": float(np.mean(chosen > rejected)),
          "chosen_score": float(chosen.mean()), "rejected_score": float(rejected.mean())}
