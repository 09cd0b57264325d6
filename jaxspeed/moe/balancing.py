"""Auxiliary-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3 §2.1.2).

Each MoE layer keeps a routing bias b [E] that the gate adds to its scores for
the top-k choice only (``jaxspeed.moe.gating``); combine weights stay the
unbiased probabilities. After every optimizer step

  b_e ← b_e + u · sign(c̄ − c_e),

where c_e counts the token-expert assignments expert e received in the step
(all microbatches and workers) and c̄ is their mean over experts: an
overloaded expert becomes less attractive, an idle one more.

The bias is a parameter of the layer (``BIAS``), so it is checkpointed,
sharded, evaluated and served with the rest, but no gradient reaches it
(it only moves an argmax / top-k): the train step overwrites whatever the
optimizer made of it with the rule above (``move_biases``), as MaxText's
``routed_bias`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

BALANCING = ("aux_loss", "bias", "none")
BIAS = "routing_bias"  # the parameter's name in each MoE layer


def bias_update(loads: jax.Array, rate: float) -> jax.Array:
  """Δb [E] = rate · sign(mean(loads) − loads) for one layer's loads [E]."""
  loads = loads.astype(jnp.float32)
  return rate * jnp.sign(jnp.mean(loads) - loads)


def move_biases(old: Any, new: Any, loads: Mapping[str, Any], rate: float) -> Any:
  """``new`` with every routing bias replaced by its ``old`` value plus ``bias_update``.

  Args:
    old: the parameters (or float32 master weights) before the step.
    new: the same tree after the optimizer's update; its other leaves are kept.
    loads: {layer path...: [E] counts}, the tree ``jaxspeed.moe.stats.step_sums``
      sums as ``moe_loads``; the path of a layer's counts is its module path.
    rate: u.

  Returns:
    ``new`` with each bias leaf in its own dtype.
  """
  flat_old = flax.traverse_util.flatten_dict(old)
  flat = dict(flax.traverse_util.flatten_dict(new))
  for path, counts in flax.traverse_util.flatten_dict(loads).items():
    key = (*path, BIAS)
    flat[key] = (flat_old[key].astype(jnp.float32) + bias_update(counts, rate)).astype(
        flat[key].dtype)
  return flax.traverse_util.unflatten_dict(flat)
