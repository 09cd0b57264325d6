"""Parameter counts of an MoE model: total, and active per token (what one token computes with)."""

from __future__ import annotations

import math
from typing import Any

import flax

from jaxspeed.moe.experts import ExpertWeights


def param_counts(params: Any, top_k: int) -> dict[str, int]:
  """``{"params": all, "active_params": per token, "expert_params": in experts}``.

  A token runs through ``top_k`` of the E experts of each MoE layer, so of an
  MoE layer's expert weights (leading axis E) only k/E are active; everything
  else (attention, gates, dense and residual MLPs, embeddings) is.
  """
  total = active = experts = 0
  for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    size = math.prod(leaf.shape)
    total += size
    if len(path) >= 2 and path[-2] == "moe" and path[-1] in ExpertWeights._fields:
      experts += size
      active += size * min(top_k, leaf.shape[0]) // leaf.shape[0]
    else:
      active += size
  return {"params": total, "active_params": active, "expert_params": experts}
