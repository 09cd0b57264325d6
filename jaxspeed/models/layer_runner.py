"""The layer loop GPT and BERT share: L blocks with Random-LTD and progressive layer dropping.

Layer-level techniques are wired here once: Random-LTD (``random_ltd``) runs
the middle layers on a random subset of tokens, PLD (``layer_drop``) skips
whole layers; both draw their randomness in the same order for every model,
so a technique added here reaches GPT and BERT alike.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from jaxspeed.models.layer_drop import draw_layer_keeps, run_or_skip
from jaxspeed.models.random_ltd import (
    active_kept_length,
    drops_tokens,
    run_on_kept_tokens,
    sample_kept_indices,
)

# (layer index, per-row positions) -> the layer's Block, named ``layer_{i}``.
MakeLayer = Callable[[int, bool], nn.Module]
# Random-LTD's kept indices idx [B, r], or None for all tokens -> the attention mask.
MaskFor = Callable[[jax.Array | None], jax.Array | None]


def run_layers(parent: nn.Module, make_layer: MakeLayer, num_layers: int, x: jax.Array,
               positions: jax.Array, mask_for: MaskFor, deterministic: bool,
               random_ltd_kept: int | None, layer_keep_theta: jax.Array | None) -> jax.Array:
  """x [B, S, d_model] through ``num_layers`` layers of ``parent`` (call from its compact method).

  Args:
    parent: the model; its rngs (``random_ltd``, ``layer_drop``) drive the
      techniques and its ``intermediates`` receive each layer's kept indices
      (``random_ltd_indices``) and PLD's keep decisions (``layer_keeps``, bool [L]).
    make_layer: builds layer i; ``per_row_positions`` is True when it runs
      on Random-LTD's per-row token subsets.
    positions: [B, S] int.
    mask_for: the attention mask for all tokens (None) or for the kept ones.
    random_ltd_kept: Random-LTD's kept length r (static); layers 1..L-2 each
      run on r random tokens per row. Off when None or >= S.
    layer_keep_theta: PLD's θ(t) (float32 scalar). Off when None.

  Neither technique draws an rng at init: the parameters are the same either
  way, and the parameter keys stay those of the plain model.
  """
  batch, seq_len = positions.shape
  init = parent.is_initializing()
  kept = None if init else active_kept_length(random_ltd_kept, seq_len)
  keeps = probs = None
  if not init and layer_keep_theta is not None:
    keeps, probs = draw_layer_keeps(parent.make_rng("layer_drop"), num_layers, layer_keep_theta)
    parent.sow("intermediates", "layer_keeps", keeps)
  for i in range(num_layers):
    idx = None
    if kept is not None and drops_tokens(i, num_layers):
      idx = sample_kept_indices(parent.make_rng("random_ltd"), batch, seq_len, kept)
      parent.sow("intermediates", "random_ltd_indices", idx)
    layer = make_layer(i, idx is not None)
    run = _runner(positions, mask_for(idx), idx, deterministic)
    x = run(layer, x, None) if keeps is None else run_or_skip(layer, run, x, keeps[i], probs[i])
  return x


def _runner(positions: jax.Array, mask: jax.Array | None, idx: jax.Array | None,
            deterministic: bool):
  """``run(layer, x [B, S, d], branch_scale) -> [B, S, d]`` on all or on idx's tokens."""
  if idx is None:
    return lambda layer, x, scale: layer(x, positions, mask, deterministic, scale)
  return lambda layer, x, scale: run_on_kept_tokens(
      lambda h, pos: layer(h, pos, mask, deterministic, scale), x, positions, idx)
