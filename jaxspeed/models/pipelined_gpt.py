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

import flax
import jax
import jax.numpy as jnp

from jaxspeed.models.attention import causal_mask
from jaxspeed.models.gpt import GPT
from jaxspeed.models.layers import Embed, constrain, layer_norm, remat_block
from jaxspeed.models.losses import cross_entropy
from jaxspeed.moe import stats as moe_stats
from jaxspeed.parallel.one_f_one_b import pipelined_loss
from jaxspeed.parallel.pipeline import (
    circular,
    from_microbatches,
    gpipe,
    layer_name,
    stack_layers,
    stacked_key,
    to_microbatches,
)
from jaxspeed.parallel.ulysses import shard_key


class PipelinedGPT(GPT):
  """``GPT`` whose layers run as ``num_stages`` GPipe stages over ``microbatches``.

  ``__call__(tokens [B, S]) -> logits [B, S, vocab]``, equal to the plain
  GPT's. Random-LTD and progressive layer dropping are not supported
  (``jaxspeed.config.validate`` rejects them with a pipeline). Dropout and the MoE
  router draw their randomness per microbatch, stage and layer, so it differs from
  the plain GPT's. MoE layers run in the stages when every layer is one (the stages
  stack alike layers); their statistics are sown as the plain GPT's layers sow them
  (``_sow_moe_stats``).
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
    stage, stacked, microbatches, extras, stats = self._stages(x, positions, deterministic)
    run = circular if self.virtual_stages > 1 else gpipe
    y, stats = run(stage, stacked, (to_microbatches(x, microbatches), stats), extras)
    self._sow_moe_stats(jax.tree.map(lambda a: jnp.sum(a, axis=0), stats), microbatches)
    return from_microbatches(y)

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
    stage, stacked, microbatches, extras, stats = self._stages(x, positions, deterministic)
    mask = jnp.ones(targets.shape, jnp.float32) if loss_mask is None else loss_mask
    # 1F1B takes each microbatch's gradient inside its schedule, so the MoE load-balancing
    # term the objective adds (``loss_sum_fn``: coef · Σ_layers l_aux · tokens, l_aux the
    # mean over microbatches here) joins each microbatch's loss there, with the weight the
    # objective gives it; the returned cross-entropy subtracts its value again (gradient
    # kept), and the statistics are sown without gradient.
    aux_weight = 0.0 if cfg.moe is None else (
        cfg.moe.loss_coef * jnp.sum(mask) / microbatches)

    def loss(head, y, target):
      """The final LayerNorm, the LM head and the loss of one microbatch (``GPT._logits``)."""
      h, stats = y
      labels, mask = target
      h = layer_norm(h, head["ln_final"]["scale"], head["ln_final"]["bias"], cfg.layernorm_eps)
      logits = constrain(h @ head["lm_head"].astype(cfg.compute_dtype), ("batch", "seq", "vocab"))
      ce, count = cross_entropy(logits.astype(jnp.float32), labels, mask)
      aux = aux_weight * jnp.sum(moe_stats.aux_loss(stats))  # over layers: [chunks] rows
      return ce + aux, {"count": count, "aux": aux, "stats": stats}

    split = lambda a: to_microbatches(a, microbatches)
    objective, sums = pipelined_loss(
        stage, loss, stacked, head, (split(x), stats), extras,
        (split(targets), split(mask.astype(jnp.float32))))
    self._sow_moe_stats(jax.lax.stop_gradient(sums["stats"]), microbatches)
    return objective - jax.lax.stop_gradient(sums["aux"]), sums["count"]

  def _stages(self, x: jax.Array, positions: jax.Array, deterministic: bool):
    """The schedule's arguments for x [B, S, d]: (stage function, stacked parameters,
    microbatches, per-microbatch extras, [m, ...] zero MoE statistics).

    A microbatch travels through the stages as (hidden states, MoE statistics): each
    chunk of layers writes its MoE layers' sown values into its own row of the
    statistics (rows indexed by the chunk, ``gpipe``'s ``stage`` argument), so they
    leave the pipeline with the microbatch and, with 1F1B, their loss term sends its
    gradient back through the same hand-offs as the hidden states'.
    """
    cfg = self.config
    stacked = self.param(stacked_key(self.virtual_stages), lambda rng: None)
    chunk_layers = cfg.num_layers // (self.num_stages * self.virtual_stages)
    block = remat_block(cfg, self.is_initializing())
    # Layer j of every chunk has the same kind (``jaxspeed.config`` checks the MoE pattern).
    blocks = [block(cfg, causal=True, pre_ln=True,
                    feed_forward=None if cfg.moe is None else cfg.moe.feed_forward_at(j))
              for j in range(chunk_layers)]
    mask = causal_mask(x.shape[1])

    def stage(layers, carry, extra, chunk):
      """One chunk's layers (a list of parameter trees) on a microbatch: hidden states
      h [b, S, d_model] and the microbatch's MoE statistics."""
      h, stats = carry
      pos, keys = extra
      stats = dict(stats)
      for i, params in enumerate(layers):  # unrolled like the plain GPT's (``split_layers``)
        # Random streams: the microbatch's key, folded with the chunk and the layer in it.
        # On sequence shards (Ulysses), also with the shard.
        rngs = None if keys is None else {
            name: shard_key(jax.random.fold_in(jax.random.fold_in(key, chunk), i))
            for name, key in keys.items()}
        h, sown = blocks[i].apply({"params": params}, h, pos, mask, deterministic, rngs=rngs,
                                  mutable=[moe_stats.COLLECTION])
        if str(i) in stats:
          stats[str(i)] = jax.tree.map(
              lambda row, value, c=chunk: row.at[c].set(value.astype(row.dtype)),
              stats[str(i)], flax.core.unfreeze(sown[moe_stats.COLLECTION]))
      return h, stats

    # A batch the configured count does not divide (e.g. sampling one row)
    # runs with fewer, larger microbatches: same result, larger bubble.
    num = math.gcd(x.shape[0], self.microbatches)
    positions = jnp.broadcast_to(positions, x.shape[:2])
    keys = None
    if not deterministic:
      streams = ("dropout",) if cfg.moe is None else ("dropout", moe_stats.COLLECTION)
      keys = {name: jax.random.split(self.make_rng(name), num) for name in streams}
    extras = (to_microbatches(positions, num), keys)
    return stage, stacked, num, extras, self._zero_moe_stats(blocks, x, num, extras)

  def _zero_moe_stats(self, blocks, x, num, extras):
    """{in-chunk layer j: its sown MoE values} with [m, chunks, ...] zero leaves."""
    chunks = self.num_stages * self.virtual_stages
    micro = jax.ShapeDtypeStruct((x.shape[0] // num, *x.shape[1:]), x.dtype)
    pos, keys = jax.tree.map(lambda a: a[0], extras)
    stats = {}
    for j, block in enumerate(blocks):
      if block.feed_forward is None:
        continue
      params = jax.tree.map(lambda a, j=j: a[0][j] if self.virtual_stages == 1 else a[0, 0][j],
                            self.variables["params"][stacked_key(self.virtual_stages)])
      rngs = None if keys is None else dict(keys)
      _, sown = jax.eval_shape(
          lambda p, h, pos, rngs, block=block: block.apply(
              {"params": p}, h, pos, causal_mask(h.shape[1]), rngs is None, rngs=rngs,
              mutable=[moe_stats.COLLECTION]), params, micro, pos, rngs)
      # float32 (counts too): 1F1B differentiates the last stage's loss w.r.t. all of them.
      stats[str(j)] = jax.tree.map(lambda a: jnp.zeros((num, chunks, *a.shape), jnp.float32),
                                   flax.core.unfreeze(sown[moe_stats.COLLECTION]))
    return stats

  def _sow_moe_stats(self, stats, microbatches: int) -> None:
    """Sows the pipeline's MoE statistics ({j: sown values, leaves [chunks, ...] summed over
    microbatches}) into the ``moe`` collection as the plain GPT's layers do, under
    ``layer_{i}``: the aux loss as its mean over microbatches, the counts as sums."""
    if not stats or not self.is_mutable_collection(moe_stats.COLLECTION):
      return
    chunk_layers = self.config.num_layers // (self.num_stages * self.virtual_stages)
    layers: dict[int, dict] = {}
    for j, values in stats.items():
      for path, (total,) in flax.traverse_util.flatten_dict(values).items():
        if path[-1] == "aux_loss":
          total = total / microbatches
        for chunk in range(total.shape[0]):
          layers.setdefault(chunk * chunk_layers + int(j), {})[path] = (total[chunk],)
    for index in sorted(layers):  # the plain GPT's order: the order its layers run
      self.put_variable(moe_stats.COLLECTION, layer_name(index),
                        flax.traverse_util.unflatten_dict(layers[index]))
