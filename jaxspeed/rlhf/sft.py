"""Step 1: supervised fine-tuning of the actor on prompt + chosen answer."""

from __future__ import annotations

import numpy as np

from jaxspeed.rlhf.data import PreferencePairs


def sft_batch(pairs: PreferencePairs, rows: np.ndarray, prompt_mask: bool) -> dict:
  """The causal-LM batch of prompt + chosen answer: inputs, targets, loss_mask [B, P + A − 1].

  DeepSpeed-Chat's loss counts the prompt tokens too; ``prompt_mask`` counts
  only the answer's.
  """
  tokens = pairs.take(rows).sequences("chosen")
  loss_mask = np.ones(tokens[:, 1:].shape, np.float32)
  if prompt_mask:
    loss_mask[:, : pairs.prompts.shape[1] - 1] = 0.0  # targets before the first answer token
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": loss_mask}
