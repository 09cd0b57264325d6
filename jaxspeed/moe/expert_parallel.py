"""Expert parallelism: experts split over a mesh axis, tokens exchanged by all-to-all.

DeepSpeed-MoE carves expert-parallel groups out of the data-parallel world:
each device holds E/ep experts and the tokens of its own slice of the batch.
Here the batch is split over ``data`` x ``fsdp`` x ``expert`` (the logical
``batch`` axis) and the expert weights' leading ``experts`` axis over
``expert``. Inside ``jax.shard_map`` each device routes its own rows, sends
expert e's capacity buffer to the device that holds e (all-to-all over
``expert``), runs its local experts on the buffers of all its ``expert`` peers
and sends the outputs back (the second all-to-all). Dropless mode exchanges
sorted rows instead (``expert_parallel_dropless``, ``jaxspeed.moe.dropless``).

Gradients follow from the shardings: a dense parameter is replicated over the
whole batch split, so its gradient is summed over data x fsdp x expert; an
expert's weights are replicated only over data x fsdp, so their gradient is
summed over the data replicas of that expert, DeepSpeed's expert-data-parallel
group. No collective for this is written by hand.

The axis names come from the logical rules in effect (``experts``, ``batch``,
``mlp``), so the model still never names a mesh axis.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from jaxspeed.moe.dropless import dropless_experts
from jaxspeed.moe.experts import ExpertWeights, capacity_experts
from jaxspeed.parallel.mesh import spec_axes


def _rules() -> dict:
  return dict(nn.get_logical_axis_rules())



def expert_parallel_size() -> int:
  """Devices the ``experts`` axis is split over in the current mesh and rules (1 if none)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = spec_axes(_rules().get("experts"))
  if mesh.empty or not axes:
    return 1
  size = 1
  for axis in axes:
    size *= mesh.shape.get(axis, 1)
  return size


def _specs(split_sequence: bool = False
           ) -> tuple[tuple[str, ...], tuple[str, ...], P, ExpertWeights]:
  """(expert axes, hidden axes, spec of [B, S, ...] rows, specs of the expert weights).

  With ``split_sequence`` the rows keep their sequence split too (``seq``'s axes).
  """
  rules = _rules()
  expert_axis = spec_axes(rules.get("experts"))
  hidden = spec_axes(rules.get("mlp"))
  sequence = spec_axes(rules.get("seq")) if split_sequence else ()
  rows = P(spec_axes(rules.get("batch")) or None, sequence or None)
  weight_specs = ExpertWeights(P(expert_axis, None, hidden or None), P(expert_axis, hidden or None),
                               P(expert_axis, hidden or None, None), P(expert_axis, None))
  return expert_axis, hidden, rows, weight_specs


def _reduce_hidden(hidden: tuple[str, ...]):
  return (lambda y: jax.lax.psum(y, hidden)) if hidden else (lambda y: y)


def expert_parallel_experts(x: jax.Array, dispatch: jax.Array, combine: jax.Array,
                            w: ExpertWeights) -> jax.Array:
  """``capacity_experts`` with experts split over the ``experts`` mesh axis.

  Args:
    x: [B, S, d] rows split over the ``batch`` axes, which must include the
      expert axis (every device routes different rows).
    dispatch, combine: [B, S, E, C].
    w: all experts' weights, [E, ...], split over the expert axis.

  Returns:
    [B, S, d], split like ``x``.
  """
  expert_axis, hidden, rows, weight_specs = _specs()

  def local(x, dispatch, combine, w):
    send = lambda b: jax.lax.all_to_all(b, expert_axis, 0, 1, tiled=True)
    receive = lambda b: jax.lax.all_to_all(b, expert_axis, 1, 0, tiled=True)
    return capacity_experts(x, dispatch, combine, w, send=send, receive=receive,
                            reduce_hidden=_reduce_hidden(hidden))

  return jax.shard_map(local, in_specs=(rows, rows, rows, weight_specs), out_specs=rows)(
      x, dispatch, combine, w)


def expert_parallel_dropless(x: jax.Array, experts: jax.Array, weights: jax.Array,
                             w: ExpertWeights, *, dedup: bool = False,
                             slack: float | None = None) -> tuple[jax.Array, jax.Array]:
  """``jaxspeed.moe.dropless.dropless_experts`` with experts split over the ``experts`` axis.

  Each device dispatches the tokens it holds: its rows of the batch and, with
  sequence parallelism, its shard of the sequence, which is never gathered
  (X-MoE's sequence-sharded MoE blocks; without a capacity, where a token is
  routed does not depend on the other tokens of its sequence). With one
  expert shard there is no exchange: each device runs every expert on its
  own tokens.

  XLA:CPU cannot run ``jax.lax.ragged_all_to_all`` (jax 0.10: "HLO opcode
  ragged-all-to-all is not supported by XLA:CPU"), so the exchange is a
  fixed-size ``all_to_all``: of the exact buffer (room for every unit a device
  could send, ep times the bytes of a balanced exchange), or with ``slack`` of
  the padding-free one, falling back to the exact one when any device's units
  overflow it.

  Args:
    x: [B, S, d] rows split over the ``batch`` axes, which must include the
      expert axis.
    experts: [B, S, k] int global expert ids; weights: [B, S, k] combine weights.
    w: all experts' weights, [E, ...], split over the expert axis.
    dedup: one unit per (token, destination shard) (redundancy-bypassing dispatch).
    slack: padding-free buffers of ``slack`` x the balanced size; None for exact.

  Returns:
    [B, S, d], split like ``x``, and whether the exact buffers ran (a bool [], the same
    on every device).
  """
  expert_axis, hidden, rows, weight_specs = _specs(split_sequence=True)
  num_shards = expert_parallel_size()
  all_axes = tuple(jax.sharding.get_abstract_mesh().axis_names)

  def local(x, experts, weights, w):
    b, s, d = x.shape
    exchange = lambda buf: (jax.lax.all_to_all(buf, expert_axis, 0, 0, tiled=True)
                            if num_shards > 1 else buf)
    y, fell_back = dropless_experts(
        x.reshape(b * s, d), experts.reshape(b * s, -1), weights.reshape(b * s, -1), w,
        num_shards=num_shards, dedup=dedup, slack=slack, send=exchange, receive=exchange,
        reduce_hidden=_reduce_hidden(hidden), reduce_max=lambda v: jax.lax.pmax(v, all_axes))
    return y.reshape(b, s, d), fell_back

  return jax.shard_map(local, in_specs=(rows, rows, rows, weight_specs),
                       out_specs=(rows, P()))(x, experts, weights, w)
