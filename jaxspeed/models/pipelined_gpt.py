"""The GPT decoder with its layer stack pipelined over the ``stage`` mesh axis.

Parameters are the plain GPT's with the L ``layer_i`` subtrees stacked into
one ``layers`` subtree of [p, L/p, ...] leaves (``jaxspeed.parallel.pipeline
.stack_layers``). ``init`` initializes the plain GPT and stacks it, so a
pipelined run starts from exactly the parameters of the plain model with the
same seed; ``unstack_layers`` converts back (e.g. for a checkpoint).

The embedding runs outside the pipeline, replicated over ``stage`` (a small
share of the FLOPs). With the ``gpipe`` schedule so does the LM head, so the
logits are the plain model's. The ``1f1b`` schedule needs each microbatch's
loss inside the schedule: the model then computes the loss itself (called with
``targets``, see ``GPT.__call__``), running the final LayerNorm, the head and
the cross-entropy per microbatch in the last stage
(``jaxspeed.parallel.one_f_one_b``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxspeed.models.attention import causal_mask
from jaxspeed.models.gpt import GPT
from jaxspeed.models.layers import Embed, constrain, layer_norm, remat_block
from jaxspeed.models.losses import cross_entropy
from jaxspeed.parallel.one_f_one_b import pipelined_loss
from jaxspeed.parallel.pipeline import (
    circular,
    from_microbatches,
    gpipe,
    stack_layers,
    stacked_key,
    to_microbatches,
)
from jaxspeed.parallel.ulysses import shard_key


class PipelinedGPT(GPT):
  """``GPT`` whose layers run as ``num_stages`` GPipe stages over ``microbatches``.

  ``__call__(tokens [B, S]) -> logits [B, S, vocab]``, equal to the plain
  GPT's. Random-LTD and progressive layer dropping are not supported
  (``jaxspeed.config.validate`` rejects them with a pipeline). Dropout draws its
  masks per microbatch, stage and layer, so they differ from the plain GPT's.
  """

  num_stages: int = 2
  microbatches: int = 1
  schedule: str = "gpipe"  # ``jaxspeed.parallel.pipeline.SCHEDULES``
  virtual_stages: int = 1  # chunks per stage of the interleaved schedule

  @property
  def computes_loss(self) -> bool:
    """Whether a train step must call the model with ``targets`` (1F1B; module docstring)."""
    return self.schedule == "1f1b"

  def init(self, rngs, *args, **kwargs):
    """The plain GPT's ``init`` (same keys, same values), layers stacked per stage."""
    variables = super().init(rngs, *args, **kwargs)
    return {**variables, "params": stack_layers(variables["params"], self.config.num_layers,
                                                self.num_stages, self.virtual_stages)}

  def layer_stack(self, x: jax.Array, positions: jax.Array, deterministic: bool,
                  random_ltd_kept: int | None, layer_keep_theta: jax.Array | None) -> jax.Array:
    """x [B, S, d_model] through the L layers, pipelined (see ``gpipe``)."""
    if self.is_initializing():  # the plain layers, stacked by ``init``
      return super().layer_stack(x, positions, deterministic, random_ltd_kept,
                                 layer_keep_theta)
    if random_ltd_kept is not None or layer_keep_theta is not None:
      raise NotImplementedError("random-LTD and layer dropping do not run in a pipeline")
    stage, stacked, microbatches, extras = self._stages(x, positions, deterministic)
    run = circular if self.virtual_stages > 1 else gpipe
    return from_microbatches(run(stage, stacked, to_microbatches(x, microbatches), extras))

  def layers_and_loss(self, embed: Embed, x: jax.Array, positions: jax.Array,
                      deterministic: bool, targets: jax.Array,
                      loss_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy, counted tokens); with 1F1B the head runs in the last stage."""
    if self.schedule != "1f1b" or self.is_initializing():
      return super().layers_and_loss(embed, x, positions, deterministic, targets, loss_mask)
    cfg = self.config
    params = self.variables["params"]
    head = {"ln_final": params["ln_final"],
            "lm_head": params["embed"]["table"].T if cfg.tie_embeddings else params["lm_head"]}

    def loss(head, y, target):
      """The final LayerNorm, the LM head and the loss of one microbatch (``GPT._logits``)."""
      labels, mask = target
      h = layer_norm(y, head["ln_final"]["scale"], head["ln_final"]["bias"], cfg.layernorm_eps)
      logits = constrain(h @ head["lm_head"].astype(cfg.compute_dtype), ("batch", "seq", "vocab"))
      return cross_entropy(logits.astype(jnp.float32), labels, mask)

    stage, stacked, microbatches, extras = self._stages(x, positions, deterministic)
    split = lambda a: to_microbatches(a, microbatches)
    mask = jnp.ones(targets.shape, jnp.float32) if loss_mask is None else loss_mask
    return pipelined_loss(stage, loss, stacked, head, split(x), extras,
                          (split(targets), split(mask.astype(jnp.float32))))

  def _stages(self, x: jax.Array, positions: jax.Array, deterministic: bool):
    """(stage function, stacked parameters, microbatches, per-microbatch extras) for x [B, S, d]."""
    stacked = self.param(stacked_key(self.virtual_stages), lambda rng: None)
    block = remat_block(self.config, self.is_initializing())(self.config, causal=True, pre_ln=True)
    mask = causal_mask(x.shape[1])

    def stage(layers, h, extra, stage_index):
      """One stage's L/p layers (a list of parameter trees) on a microbatch h [b, S, d_model]."""
      pos, key = extra
      for i, params in enumerate(layers):  # unrolled like the plain GPT's (``split_layers``)
        # Dropout: the microbatch's key, folded with the stage and the layer in it.
        # On sequence shards (Ulysses), also with the shard.
        rngs = None if key is None else {
            "dropout": shard_key(jax.random.fold_in(jax.random.fold_in(key, stage_index), i))}
        h = block.apply({"params": params}, h, pos, mask, deterministic, rngs=rngs)
      return h

    # A batch the configured count does not divide (e.g. sampling one row)
    # runs with fewer, larger microbatches: same result, larger bubble.
    num = math.gcd(x.shape[0], self.microbatches)
    positions = jnp.broadcast_to(positions, x.shape[:2])
    keys = None if deterministic else jax.random.split(self.make_rng("dropout"), num)
    return stage, stacked, num, (to_microbatches(positions, num), keys)
