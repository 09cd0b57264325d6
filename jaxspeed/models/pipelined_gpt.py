"""The GPT decoder with its layer stack pipelined over the ``stage`` mesh axis.

Parameters are the plain GPT's with the L ``layer_i`` subtrees stacked into
one ``layers`` subtree of [p, L/p, ...] leaves (``jaxspeed.parallel.pipeline
.stack_layers``). ``init`` initializes the plain GPT and stacks it, so a
pipelined run starts from exactly the parameters of the plain model with the
same seed; ``unstack_layers`` converts back (e.g. for a checkpoint).

The embedding and the LM head run outside the pipeline, replicated over
``stage`` (they are a small share of the FLOPs), so the logits and the loss
are the plain model's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxspeed.models.attention import causal_mask
from jaxspeed.models.gpt import GPT
from jaxspeed.models.layers import remat_block
from jaxspeed.parallel.pipeline import (
    STACKED,
    from_microbatches,
    gpipe,
    stack_layers,
    to_microbatches,
)


class PipelinedGPT(GPT):
  """``GPT`` whose layers run as ``num_stages`` GPipe stages over ``microbatches``.

  ``__call__(tokens [B, S]) -> logits [B, S, vocab]``, equal to the plain
  GPT's. Random-LTD and progressive layer dropping are not supported
  (``jaxspeed.config.validate`` rejects them with a pipeline). Dropout draws its
  masks per microbatch, stage and layer, so they differ from the plain GPT's.
  """

  num_stages: int = 2
  microbatches: int = 1

  def init(self, rngs, *args, **kwargs):
    """The plain GPT's ``init`` (same keys, same values), layers stacked per stage."""
    variables = super().init(rngs, *args, **kwargs)
    return {**variables, "params": stack_layers(variables["params"], self.config.num_layers,
                                                self.num_stages)}

  def layer_stack(self, x: jax.Array, positions: jax.Array, deterministic: bool,
                  random_ltd_kept: int | None, layer_keep_theta: jax.Array | None) -> jax.Array:
    """x [B, S, d_model] through the L layers, pipelined (see ``gpipe``)."""
    if self.is_initializing():  # the plain layers, stacked by ``init``
      return super().layer_stack(x, positions, deterministic, random_ltd_kept,
                                 layer_keep_theta)
    if random_ltd_kept is not None or layer_keep_theta is not None:
      raise NotImplementedError("random-LTD and layer dropping do not run in a pipeline")
    stacked = self.param(STACKED, lambda rng: None)
    block = remat_block(self.config, self.is_initializing())(self.config, causal=True, pre_ln=True)
    mask = causal_mask(x.shape[1])

    def stage(layers, h, extra, stage_index):
      """One stage's L/p layers (a list of parameter trees) on a microbatch h [b, S, d_model]."""
      pos, key = extra
      for i, params in enumerate(layers):  # unrolled like the plain GPT's (``split_layers``)
        # Dropout: the microbatch's key, folded with the stage and the layer in it.
        rngs = None if key is None else {
            "dropout": jax.random.fold_in(jax.random.fold_in(key, stage_index), i)}
        h = block.apply({"params": params}, h, pos, mask, deterministic, rngs=rngs)
      return h

    # A batch the configured count does not divide (e.g. sampling one row)
    # runs with fewer, larger microbatches: same result, larger bubble.
    num = math.gcd(x.shape[0], self.microbatches)
    positions = jnp.broadcast_to(positions, x.shape[:2])
    keys = None if deterministic else jax.random.split(self.make_rng("dropout"), num)
    y = gpipe(stage, stacked, to_microbatches(x, num), (to_microbatches(positions, num), keys))
    return from_microbatches(y)
