"""What the MoE layers ``sow`` in the ``moe`` collection, turned into loss terms and metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

COLLECTION = "moe"


def _by_path(collection: Mapping[str, Any]) -> dict[tuple, dict[str, Any]]:
  """Each MoE layer's sown values by its module path, in the order the layers ran (flax
  keeps 1-tuples)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(collection))
  layers: dict[tuple, dict[str, Any]] = {}
  for path, value in flat.items():
    layers.setdefault(path[:-1], {})[path[-1]] = value[0] if isinstance(value, tuple) else value
  return layers


def _layers(collection: Mapping[str, Any]) -> list[dict[str, Any]]:
  return list(_by_path(collection).values())


def aux_loss(collection: Mapping[str, Any]) -> jax.Array:
  """Σ over MoE layers of the load-balancing loss (DeepSpeed sums ``l_aux`` of all layers)."""
  return sum((layer["aux_loss"] for layer in _layers(collection)), jnp.float32(0))


def step_sums(collection: Mapping[str, Any], tokens: jax.Array) -> dict[str, Any]:
  """Sums that add up over microbatches and workers; ``{}`` for a dense model.

  ``moe_aux_sum`` is Σ_layers aux weighted by the batch's ``tokens``, so that
  its total over microbatches divided by all tokens is the token-mean aux loss.
  ``moe_loads`` is each layer's [E] routed counts under its module path, what
  ``jaxspeed.moe.balancing.move_biases`` reads.
  """
  by_path = _by_path(collection)
  layers = list(by_path.values())
  if not layers:
    return {}
  loads = flax.traverse_util.unflatten_dict(
      {path: layer["expert_counts"] for path, layer in by_path.items()})
  return {"moe_loads": loads, "moe_aux_sum": aux_loss(collection) * tokens,
          "moe_dropped": sum(layer["dropped"] for layer in layers).astype(jnp.float32),
          "moe_routed": sum(jnp.sum(layer["expert_counts"]) for layer in layers
                            ).astype(jnp.float32),
          "moe_expert_tokens": jnp.concatenate([layer["expert_counts"] for layer in layers]),
          "moe_dispatch_fallbacks": sum(layer.get("dispatch_fallback", jnp.int32(0))
                                        for layer in layers)}


def step_metrics(sums: Mapping[str, jax.Array], tokens: jax.Array) -> dict[str, jax.Array]:
  """``moe_aux_loss`` (Σ_layers, token mean), ``moe_dropped_fraction`` of the routed
  token-expert assignments, ``moe_expert_tokens`` ([Σ_layers E] tokens routed to each
  expert, layers concatenated) and ``moe_dispatch_fallbacks`` (MoE layers, times
  microbatches, whose padding-free dispatch overflowed and ran the exact buffers)."""
  if "moe_aux_sum" not in sums:
    return {}
  return {"moe_aux_loss": sums["moe_aux_sum"] / tokens,
          "moe_dropped_fraction": sums["moe_dropped"] / jnp.maximum(sums["moe_routed"], 1.0),
          "moe_expert_tokens": sums["moe_expert_tokens"],
          "moe_dispatch_fallbacks": sums["moe_dispatch_fallbacks"]}
