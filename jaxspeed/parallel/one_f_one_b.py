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
    split_layers,
    stage_map,
    token_spec,
)

# (head params, y [b, ...], target) -> (loss sum, counted tokens): the head and the loss
# of one microbatch; ``target`` is any pytree of [b, ...] arrays (e.g. targets and mask).
LossFn = Callable[[Any, jax.Array, Any], tuple[jax.Array, jax.Array]]


def in_flight(num_stages: int, microbatches: int) -> int:
  """Microbatch inputs a stage keeps at once: min(2p − 1, m) (module docstring)."""
  return min(2 * num_stages - 1, microbatches)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def pipelined_loss(stage_fn: StageFn, loss_fn: LossFn, stage_params, head_params,
                   inputs: jax.Array, extras, targets) -> tuple[jax.Array, jax.Array]:
  """Σ_j loss_fn(head, stages(inputs[j])) over microbatches j, pipelined with 1F1B.

  Args:
    stage_fn: as for ``gpipe``.
    loss_fn: the head and loss of one microbatch (``LossFn``); its second result
      (e.g. a token count) gets no gradient.
    stage_params: pytree of [p, L/p, ...] leaves, split over ``stage``.
    head_params: the head's parameters, replicated over ``stage``.
    inputs: [m, b, ...] microbatches, replicated over ``stage``.
    extras: as for ``gpipe`` (no gradient).
    targets: pytree of [m, b, ...] per-microbatch ``loss_fn`` targets (no gradient).

  Returns:
    (Σ loss, Σ count) over the m microbatches.
  """
  return _gpipe_loss(stage_fn, loss_fn, stage_params, head_params, inputs, extras, targets)


def _add_where(keep: jax.Array, sums, values):
  """sums + values where ``keep`` (a filler slot's values are dropped), in float32."""
  return jax.tree.map(lambda a, v: a + jnp.where(keep, v, 0.0).astype(jnp.float32), sums, values)


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
    (loss, count), vjp = jax.vjp(total, stage_params, head_params, inputs)
    return (loss, count), vjp((jnp.ones_like(loss), jnp.zeros_like(count)))
  microbatches = inputs.shape[0]
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
    zero_x = jnp.zeros_like(inputs[0])
    stored = jnp.zeros((slots, *inputs.shape[1:]), inputs.dtype)  # the ring of stage inputs
    received, received_grad = zero_x, zero_x
    layer_grads = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), layers)
    head_grads = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), head)
    losses, input_grads = [], []
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)

    def run(layers, x, micro):
      return stage_fn(layers, x, at(extras, micro), stage)

    for t in range(microbatches + 2 * num_stages - 2):
      forward_tick = t < microbatches + last  # some stage has a microbatch to run forward
      backward_tick = t >= last  # some stage has one to run backward
      if forward_tick:
        micro = jnp.clip(t - stage, 0, microbatches - 1)
        x = jnp.where(stage == 0, inputs[min(t, microbatches - 1)], received)
        slot = micro % slots
        valid = (t - stage >= 0) & (t - stage < microbatches)
        stored = jax.lax.dynamic_update_index_in_dim(
            stored, jnp.where(valid, x, stored[slot]), slot, 0)
        y = run(layers, x, micro)
      if backward_tick:
        if t < microbatches + last:  # the last stage's microbatch t − (p − 1): the loss
          j = t - last
          (loss, count), (d_head, d_y) = jax.value_and_grad(
              loss_fn, argnums=(0, 1), has_aux=True)(head, y, at(targets, j))
          is_last = stage == last
          losses.append(jnp.where(is_last, jnp.stack([loss, count]), 0.0))
          head_grads = _add_where(is_last, head_grads, d_head)
        else:
          d_y = zero_x
        micro = jnp.clip(t - (2 * last - stage), 0, microbatches - 1)
        valid = (t - (2 * last - stage) >= 0) & (t - (2 * last - stage) < microbatches)
        d_y = jnp.where(stage == last, d_y.astype(zero_x.dtype), received_grad)
        _, vjp = jax.vjp(lambda lp, xx, m=micro: run(lp, xx, m), layers, stored[micro % slots])
        d_layers, d_x = vjp(d_y)
        layer_grads = _add_where(valid, layer_grads, d_layers)
        if t >= 2 * last:  # stage 0 finished microbatch t − 2(p − 1): the input's gradient
          input_grads.append(jnp.where(stage == 0, d_x, jnp.zeros_like(d_x)))
        received_grad = jax.lax.ppermute(d_x, STAGE_AXIS, down)
      if forward_tick:
        received = jax.lax.ppermute(y, STAGE_AXIS, up)

    loss, count = jax.lax.psum(jnp.sum(jnp.stack(losses), axis=0), manual_axes())
    input_grads = jax.lax.psum(jnp.stack(input_grads), STAGE_AXIS)
    head_grads = jax.lax.psum(head_grads, STAGE_AXIS)
    stacked = jax.tree.map(lambda *g: jnp.stack(g)[None], *layer_grads)
    return (loss, count), (stacked, head_grads, input_grads)

  stage_spec = jax.tree.map(lambda _: P(STAGE_AXIS), stage_params)
  (loss, count), (d_params, d_head, d_inputs) = stage_map(
      schedule, stage_params, (head_params, inputs, extras, targets),
      ((P(), P()), (stage_spec, jax.tree.map(lambda _: P(), head_params), token_spec(inputs))))
  cast = lambda grads, like: jax.tree.map(lambda g, p: g.astype(p.dtype), grads, like)
  return (loss, count), (cast(d_params, stage_params), cast(d_head, head_params),
                         d_inputs.astype(inputs.dtype))


def _bwd(stage_fn, loss_fn, grads, cotangents):
  del stage_fn, loss_fn
  d_loss, _ = cotangents  # the count gets no gradient
  scale = lambda tree: jax.tree.map(lambda g: (g * d_loss).astype(g.dtype), tree)
  d_params, d_head, d_inputs = grads
  return scale(d_params), scale(d_head), scale(d_inputs), None, None


pipelined_loss.defvjp(_forward_and_gradients, _bwd)
