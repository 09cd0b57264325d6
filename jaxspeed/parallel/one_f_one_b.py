"""The 1F1B pipeline schedule (PipeDream-flush; Narayanan et al. 2021, §2.2), DeepSpeed's.

GPipe (``jaxspeed.parallel.pipeline.gpipe``) runs every microbatch forward
before any runs backward, so each stage keeps what the backward pass needs of
all m microbatches. 1F1B starts a microbatch's backward pass as soon as the
last stage has its loss: a stage then holds the inputs of a bounded number of
microbatches in flight, independent of m.

Here the schedule runs in lockstep ticks, one SPMD program for all stages. In
tick t stage s runs the forward pass of microbatch t − s and then the backward
pass of microbatch t − (2p − 2 − s): the last stage takes the microbatch it
has just run forward through the loss and back, and each gradient moves one
stage down per tick, as each activation moves one stage up. A stage keeps the
inputs of 2(p − 1 − s) + 1 microbatches (at most 2p − 1, at stage 0) in a ring
buffer; its backward pass recomputes the stage's forward from the stored input
(``jax.vjp``), so nothing else of a microbatch outlives its tick. The first
p − 1 ticks run no backward pass and the last p − 1 no forward pass (on any
stage), so the filler work is GPipe's: p − 1 of m + p − 1 slots, each F + B.

Because the loss of a microbatch is needed inside the schedule, the function
pipelined is "layers, then the head and the loss": ``pipelined_loss`` returns
summed losses, and its gradient comes from the schedule, which computes the
gradients during the forward call (a ``jax.custom_vjp`` whose backward rule
only scales them). Called without differentiation it runs GPipe's forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxspeed.parallel.pipeline import (
    STAGE_AXIS,
    StageFn,
    gpipe,
    manual_axes,
    select,
    split_layers,
    stage_map,
    token_specs,
)

# (head params, y [b, ...], target) -> (loss sum, sums): the head and the loss of one
# microbatch; ``target`` is any pytree of [b, ...] arrays (e.g. targets and mask), ``sums``
# any pytree of values that add up over microbatches (e.g. the counted tokens).
LossFn = Callable[[Any, jax.Array, Any], tuple[jax.Array, jax.Array]]


def in_flight(num_stages: int, microbatches: int) -> int:
  """Microbatch inputs a stage keeps at once: min(2p − 1, m) (module docstring)."""
  return min(2 * num_stages - 1, microbatches)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def pipelined_loss(stage_fn: StageFn, loss_fn: LossFn, stage_params, head_params,
                   inputs, extras, targets) -> tuple[jax.Array, Any]:
  """Σ_j loss_fn(head, stages(inputs[j])) over microbatches j, pipelined with 1F1B.

  Args:
    stage_fn: as for ``gpipe``.
    loss_fn: the head and loss of one microbatch (``LossFn``); its second result
      (e.g. a token count) gets no gradient.
    stage_params: pytree of [p, L/p, ...] leaves, split over ``stage``.
    head_params: the head's parameters, replicated over ``stage``.
    inputs: [m, b, ...] microbatches (or a pytree of them, as for ``gpipe``),
      replicated over ``stage``.
    extras: as for ``gpipe`` (no gradient).
    targets: pytree of [m, b, ...] per-microbatch ``loss_fn`` targets (no gradient).

  Returns:
    (Σ loss, Σ sums) over the m microbatches.
  """
  return _gpipe_loss(stage_fn, loss_fn, stage_params, head_params, inputs, extras, targets)


def _add_where(keep: jax.Array, sums, values):
  """sums + values where ``keep`` (a filler slot's values are dropped), in float32."""
  return jax.tree.map(lambda a, v: a + jnp.where(keep, v, 0.0).astype(jnp.float32), sums, values)


def _psum_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """``psum`` over ``axes`` of a value that may vary over only some of them (e.g. a loss
  term that does not depend on the sequence shard): each device's value counts once."""
  uniform = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
  return jax.lax.psum(jax.lax.pcast(x, uniform, to="varying") if uniform else x, axes)


def _gpipe_loss(stage_fn, loss_fn, stage_params, head_params, inputs, extras, targets):
  """``pipelined_loss`` by GPipe's forward, then the loss of every microbatch."""
  outputs = gpipe(stage_fn, stage_params, inputs, extras)
  losses = jax.lax.map(lambda args: loss_fn(head_params, *args), (outputs, targets))
  return jax.tree.map(lambda x: jnp.sum(x, axis=0), losses)


def _forward_and_gradients(stage_fn, loss_fn, stage_params, head_params, inputs, extras,
                           targets):
  """``pipelined_loss``'s value and its gradients, by the 1F1B schedule."""
  num_stages = jax.tree.leaves(stage_params)[0].shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(STAGE_AXIS, 1) == 1:  # one device: plain autodiff
    def total(params, head, x):
      return _gpipe_loss(stage_fn, loss_fn, params, head, x, extras, targets)
    (loss, sums), vjp = jax.vjp(total, stage_params, head_params, inputs)
    return (loss, sums), vjp((jnp.ones_like(loss), jax.tree.map(jnp.zeros_like, sums)))
  microbatches = jax.tree.leaves(inputs)[0].shape[0]
  last = num_stages - 1
  slots = in_flight(num_stages, microbatches)
  up = [(s, s + 1) for s in range(last)]
  down = [(s + 1, s) for s in range(last)]

  def schedule(params, head, inputs, extras, targets):
    layers = split_layers(jax.tree.map(lambda a: a[0], params))  # this device's stage
    stage = jax.lax.axis_index(STAGE_AXIS)
    # Declared varying once: the gradients w.r.t. them are then this stage's own,
    # summed over stages once at the end instead of in every tick.
    head = jax.lax.pcast(head, STAGE_AXIS, to="varying")
    inputs = jax.lax.pcast(inputs, STAGE_AXIS, to="varying")
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    zero_x = jax.tree.map(jnp.zeros_like, at(inputs, 0))
    # The ring of stage inputs, [slots, ...] per leaf.
    stored = jax.tree.map(lambda a: jnp.zeros((slots, *a.shape[1:]), a.dtype), inputs)
    received, received_grad = zero_x, zero_x
    layer_grads = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), layers)
    head_grads = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), head)
    losses, input_grads = [], []

    def run(layers, x, micro):
      return stage_fn(layers, x, at(extras, micro), stage)

    for t in range(microbatches + 2 * num_stages - 2):
      forward_tick = t < microbatches + last  # some stage has a microbatch to run forward
      backward_tick = t >= last  # some stage has one to run backward
      if forward_tick:
        micro = jnp.clip(t - stage, 0, microbatches - 1)
        x = select(stage == 0, at(inputs, min(t, microbatches - 1)), received)
        slot = micro % slots
        valid = (t - stage >= 0) & (t - stage < microbatches)
        stored = jax.tree.map(
            lambda buf, v, ok=valid, i=slot: jax.lax.dynamic_update_index_in_dim(
                buf, jnp.where(ok, v, buf[i]), i, 0), stored, x)
        y = run(layers, x, micro)
      if backward_tick:
        if t < microbatches + last:  # the last stage's microbatch t − (p − 1): the loss
          j = t - last
          (loss, sums), (d_head, d_y) = jax.value_and_grad(
              loss_fn, argnums=(0, 1), has_aux=True)(head, y, at(targets, j))
          is_last = stage == last
          losses.append(select(is_last, (loss, sums),
                                jax.tree.map(jnp.zeros_like, (loss, sums))))
          head_grads = _add_where(is_last, head_grads, d_head)
        else:
          d_y = zero_x
        micro = jnp.clip(t - (2 * last - stage), 0, microbatches - 1)
        valid = (t - (2 * last - stage) >= 0) & (t - (2 * last - stage) < microbatches)
        d_y = select(stage == last, jax.tree.map(lambda g, z: g.astype(z.dtype), d_y, zero_x),
                      received_grad)
        _, vjp = jax.vjp(lambda lp, xx, m=micro: run(lp, xx, m), layers,
                         at(stored, micro % slots))
        d_layers, d_x = vjp(d_y)
        layer_grads = _add_where(valid, layer_grads, d_layers)
        if t >= 2 * last:  # stage 0 finished microbatch t − 2(p − 1): the input's gradient
          input_grads.append(select(stage == 0, d_x, jax.tree.map(jnp.zeros_like, d_x)))
        received_grad = jax.lax.ppermute(d_x, STAGE_AXIS, down)
      if forward_tick:
        received = jax.lax.ppermute(y, STAGE_AXIS, up)

    total = jax.tree.map(lambda *v: jnp.sum(jnp.stack(v), axis=0), *losses)
    loss, sums = jax.tree.map(lambda x: _psum_varying(x, manual_axes()), total)
    input_grads = jax.lax.psum(jax.tree.map(lambda *g: jnp.stack(g), *input_grads), STAGE_AXIS)
    head_grads = jax.lax.psum(head_grads, STAGE_AXIS)
    stacked = jax.tree.map(lambda *g: jnp.stack(g)[None], *layer_grads)
    return (loss, sums), (stacked, head_grads, input_grads)

  stage_spec = jax.tree.map(lambda _: P(STAGE_AXIS), stage_params)
  sums_spec = jax.tree.map(lambda _: P(), jax.eval_shape(
      lambda: loss_fn(head_params, jax.tree.map(lambda a: a[0], inputs),
                      jax.tree.map(lambda a: a[0], targets))[1]))
  (loss, sums), (d_params, d_head, d_inputs) = stage_map(
      schedule, stage_params, (head_params, inputs, extras, targets),
      ((P(), sums_spec), (stage_spec, jax.tree.map(lambda _: P(), head_params),
                          token_specs(inputs))))
  cast = lambda grads, like: jax.tree.map(lambda g, p: g.astype(p.dtype), grads, like)
  return (loss, sums), (cast(d_params, stage_params), cast(d_head, head_params),
                        cast(d_inputs, inputs))


def _bwd(stage_fn, loss_fn, grads, cotangents):
  del stage_fn, loss_fn
  d_loss, _ = cotangents  # the sums get no gradient
  scale = lambda tree: jax.tree.map(lambda g: (g * d_loss).astype(g.dtype), tree)
  d_params, d_head, d_inputs = grads
  return scale(d_params), scale(d_head), scale(d_inputs), None, None


pipelined_loss.defvjp(_forward_and_gradients, _bwd)
