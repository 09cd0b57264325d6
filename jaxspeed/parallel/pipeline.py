"""Pipeline parallelism over the ``stage`` mesh axis: stacking, and the GPipe and
interleaved schedules (1F1B is ``jaxspeed.parallel.one_f_one_b``).

The L layers are split into p stages of L/p consecutive layers. Their
parameters are stacked into arrays with a leading [p, L/p] pair of dimensions
(logical axes ``stage`` and ``layers``), and the ``stage`` dimension is split
over the ``stage`` mesh axis: device group s holds stage s's layers only.

The batch is cut into m microbatches. In iteration t = 0 .. m + p − 2 every
stage s runs its layers on microbatch t − s at once (one SPMD program), then
hands its output to stage s + 1 with a ``ppermute``: GPipe's forward
wavefront. The backward pass is the autodiff transpose of that loop (the
reverse wavefront, the ``ppermute`` reversed). In the first and last p − 1
iterations some stages have no microbatch and compute on filler: the bubble,
(p − 1) / (m + p − 1) of the iterations (``bubble_fraction``) (GPipe, Huang
et al. 2019). The interleaved schedule (``circular``) gives each stage v
chunks of layers and shrinks the bubble v-fold.

Only the stage axis (and ``sequence``, with Ulysses) is manual inside the
``shard_map`` (``stage_map``); the data and tensor axes stay automatic, so
data, ZeRO and tensor parallelism inside a stage are the same sharding rules
as without a pipeline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxspeed.parallel.ulysses import SEQUENCE_AXIS, sequence_parallel_size

STAGE_AXIS = "stage"  # the mesh axis, and the logical name of the stacked stage dimension
LAYERS = "layers"  # logical name of the layer-within-stage dimension (never sharded)
STACKED = "layers"  # the parameter collection key of the stacked layers
# The key of the layers stacked for the interleaved schedule, [p, v, L/(p·v), ...]: its
# own key, so a checkpoint says which of the two stackings it holds.
CIRCULAR = "circular_layers"
VIRTUAL = "virtual"  # logical name of its virtual-stage dimension (never sharded)
# ``pipeline.schedule``: GPipe (``gpipe``), 1F1B (``jaxspeed.parallel.one_f_one_b``) and the
# interleaved (circular) schedule (``circular``).
SCHEDULES = ("gpipe", "1f1b", "interleaved")


def bubble_fraction(num_stages: int, microbatches: int, virtual_stages: int = 1) -> float:
  """The idle share of a step, (p − 1) / (v·m + p − 1): GPipe's (and 1F1B's) with v = 1
  (Huang et al. 2019, §2.2), the interleaved schedule's with v chunks per stage
  (Narayanan et al. 2021, §2.2)."""
  return (num_stages - 1) / (virtual_stages * microbatches + num_stages - 1)


def layer_name(index: int) -> str:
  """The parameter key of layer ``index`` in the plain (unstacked) GPT."""
  return f"layer_{index}"


def is_layer_name(key: str) -> bool:
  """Whether ``key`` is a ``layer_name``: a transformer block's parameter key."""
  return re.fullmatch(r"layer_\d+", key) is not None


def stacked_key(virtual_stages: int) -> str:
  """The parameter key of the stacked layers: ``layers``, or ``circular_layers`` if v > 1."""
  return STACKED if virtual_stages == 1 else CIRCULAR


def _stack_leaf(leaves: list, num_stages: int, virtual_stages: int):
  """Stacks L per-layer leaves into one [p, L/p, ...] or [p, v, L/(p·v), ...] leaf."""
  if isinstance(leaves[0], nn.Partitioned):
    value = _stack_leaf([x.value for x in leaves], num_stages, virtual_stages)
    stacked = (STAGE_AXIS, LAYERS) if virtual_stages == 1 else (STAGE_AXIS, VIRTUAL, LAYERS)
    # ``replace`` keeps the box's class (flax's LogicallyPartitioned and its rules).
    return leaves[0].replace(value=value, names=(*stacked, *leaves[0].names))
  stacked = jnp.stack(leaves)
  if virtual_stages == 1:
    return stacked.reshape(num_stages, len(leaves) // num_stages, *stacked.shape[1:])
  # Chunk k = r·p + s of L/(p·v) consecutive layers goes to stage s as its r-th chunk.
  chunked = stacked.reshape(virtual_stages, num_stages, -1, *stacked.shape[1:])
  return jnp.swapaxes(chunked, 0, 1)


def stack_layers(params: dict[str, Any], num_layers: int, num_stages: int,
                 virtual_stages: int = 1) -> dict[str, Any]:
  """Plain GPT parameters (``layer_0`` .. ``layer_{L-1}``) -> the pipelined layout.

  Args:
    params: the GPT's ``params`` collection; leaves plain or ``nn.Partitioned``.
    num_layers: L.
    num_stages: p; p·v must divide L.
    virtual_stages: v, the interleaved schedule's chunks per stage (1 otherwise).

  Returns:
    The same dict with the L layer subtrees replaced by one subtree. With
    v = 1 it is ``"layers"``, leaves [p, L/p, ...]: stage s holds layers
    s·L/p .. (s + 1)·L/p − 1, logical names ``("stage", "layers", ...)``. With
    v > 1 it is ``"circular_layers"``, leaves [p, v, L/(p·v), ...]: the L
    layers cut into p·v chunks, chunk r·p + s held by stage s as its r-th
    (round-robin), names ``("stage", "virtual", "layers", ...)``.
  """
  if num_layers % (num_stages * virtual_stages):
    raise ValueError(f"{num_layers} layers do not split evenly into {num_stages} stages x "
                     f"{virtual_stages} virtual stages")
  rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
  layers = [params[layer_name(i)] for i in range(num_layers)]
  is_box = lambda x: isinstance(x, nn.Partitioned)
  rest[stacked_key(virtual_stages)] = jax.tree.map(
      lambda *xs: _stack_leaf(list(xs), num_stages, virtual_stages), *layers, is_leaf=is_box)
  return rest


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """The inverse of ``stack_layers``: back to ``layer_0`` .. ``layer_{L-1}`` (plain leaves)."""
  params = dict(params)
  circular = CIRCULAR in params
  stacked = params.pop(CIRCULAR if circular else STACKED)
  if circular:  # [p, v, c, ...] -> [v, p, c, ...]: chunk r·p + s in order
    stacked = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), stacked)
  first = jax.tree.leaves(stacked)[0]
  stacked_dims = 3 if circular else 2
  num_layers = math.prod(first.shape[:stacked_dims])
  flat = jax.tree.map(lambda x: x.reshape(num_layers, *x.shape[stacked_dims:]), stacked)
  for i in range(num_layers):
    params[layer_name(i)] = jax.tree.map(lambda x, i=i: x[i], flat)
  return params


def to_microbatches(x: jax.Array, num: int) -> jax.Array:
  """[B, ...] -> [num, B/num, ...]; microbatch j takes rows j, j + num, j + 2·num, ...

  Strided rather than contiguous: with the rows split over data-parallel
  devices, every device keeps an equal share of each microbatch, so the
  split moves no data.
  """
  x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
  return jnp.swapaxes(x, 0, 1)


def from_microbatches(x: jax.Array) -> jax.Array:
  """The inverse of ``to_microbatches``: [num, B/num, ...] -> [B, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


# (layers, x, extra, stage index) -> y: one stage's layers on a microbatch (see ``gpipe``).
# x and y are the same pytree: e.g. the hidden states and the MoE layers' statistics.
StageFn = Callable[[list, Any, Any, jax.Array], Any]


def _on_sequence_shards() -> bool:
  """Whether Ulysses splits tokens over ``sequence``: the stages then run on sequence shards."""
  return sequence_parallel_size() > 1


def token_spec(x: jax.Array) -> P:
  """The schedule's spec of a per-microbatch leaf: a [m, b, S, ...] leaf (ndim >= 3) is split
  over ``sequence`` on S when Ulysses is on; every other leaf is replicated."""
  return P(None, None, SEQUENCE_AXIS) if _on_sequence_shards() and x.ndim >= 3 else P()


def token_specs(tree) -> Any:
  """``token_spec`` of every leaf of ``tree``."""
  return jax.tree.map(token_spec, tree)


def select(on: jax.Array, tree, otherwise):
  """``tree`` where ``on`` (a traced bool), else ``otherwise``; leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(on, a, b), tree, otherwise)


def _from_last_stage(outputs: list, stage: jax.Array, last: int):
  """The last stage's per-microbatch outputs, stacked [m, ...] and handed to every stage
  (the embedding and the head run replicated)."""
  stacked = jax.tree.map(lambda *ys: jnp.stack(ys), *outputs)
  return jax.lax.psum(select(stage == last, stacked, jax.tree.map(jnp.zeros_like, stacked)),
                      STAGE_AXIS)


def stage_map(schedule: Callable, stage_params, args: tuple, out_specs):
  """``schedule(params, *args)`` per stage: a ``shard_map`` manual over ``stage``.

  ``stage_params`` ([p, ...] leaves) is split over ``stage``; ``args`` leaves
  take ``token_spec``. With Ulysses on, ``sequence`` is manual too and the
  schedule runs on each device's sequence shard, under logical rules that no
  longer split ``seq`` (its arrays are local); attention exchanges the shards
  itself (``jaxspeed.parallel.ulysses``). The data and tensor axes stay
  automatic: data, ZeRO and tensor parallelism inside a stage are the same
  sharding rules as without a pipeline.
  """
  body, axes = schedule, {STAGE_AXIS}
  if _on_sequence_shards():
    axes = {STAGE_AXIS, SEQUENCE_AXIS}
    rules = tuple((name, None if name == "seq" else axis)
                  for name, axis in nn.get_logical_axis_rules())

    def body(*values):
      with nn.logical_axis_rules(rules):
        return schedule(*values)
  in_specs = (jax.tree.map(lambda _: P(STAGE_AXIS), stage_params),
              *(token_specs(arg) for arg in args))
  return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                       out_specs=out_specs, axis_names=axes)(stage_params, *args)


def manual_axes() -> tuple[str, ...]:
  """The axes a schedule's per-stage sums run over: ``stage``, and ``sequence`` with Ulysses."""
  return (STAGE_AXIS, SEQUENCE_AXIS) if _on_sequence_shards() else (STAGE_AXIS,)


def split_layers(stage: Any) -> list:
  """One stage's parameters, leaves [L/p, ...] -> a list of L/p per-layer pytrees.

  Split once, before the schedule's iterations: each iteration then reads
  each layer's parameters whole, and the compiled step reduces all layers'
  gradients over the data axes in a few combined all-reduces. Scanning over
  the stacked leaves inside every iteration made XLA all-reduce every layer's
  gradient separately in every iteration (measured: m·L/p all-reduces, each a
  wait for every device, per step). The combined all-reduces still carry one
  partial gradient per iteration, summed after (XLA does not sum first).
  """
  num_layers = jax.tree.leaves(stage)[0].shape[0]
  return [jax.tree.map(lambda a, i=i: a[i], stage) for i in range(num_layers)]


def run_stages_sequentially(stage_fn: StageFn, stage_params, inputs: jax.Array, extras=None):
  """The pure-JAX reference: every microbatch through stage 0, then 1, ... on one device.

  Same arguments and result as ``gpipe``; used when the mesh has no ``stage``
  axis (e.g. sampling outside the training mesh) and as the test reference.
  """
  num_stages = jax.tree.leaves(stage_params)[0].shape[0]
  stages = [split_layers(jax.tree.map(lambda a, s=s: a[s], stage_params))
            for s in range(num_stages)]

  def one_microbatch(x, extra):
    for s, layers in enumerate(stages):
      x = stage_fn(layers, x, extra, jnp.int32(s))
    return x

  return jax.lax.map(lambda args: one_microbatch(*args), (inputs, extras))


def gpipe(stage_fn: StageFn, stage_params, inputs: jax.Array, extras=None) -> jax.Array:
  """Runs ``inputs`` through p pipelined stages with the GPipe schedule.

  Args:
    stage_fn: ``(layers, x [b, ...], extra, stage) -> y [b, ...]``: the stage's
      L/p layers on x, given their parameters as a list of L/p per-layer pytrees
      (``split_layers``) and the stage's index (an int32 scalar, e.g. for random
      keys); y has x's shape and dtype.
    stage_params: pytree of [p, L/p, ...] leaves, split over ``stage``.
    inputs: [m, b, ...] microbatches (``to_microbatches``), replicated over
      ``stage``; or a pytree of [m, ...] leaves, which ``stage_fn`` takes and
      returns leaf for leaf.
    extras: pytree of [m, ...] per-microbatch values every stage reads
      (e.g. positions), or None.

  Returns:
    [m, b, ...] (``inputs``' structure): the last stage's output for every
    microbatch, replicated over ``stage``.
  """
  num_stages = jax.tree.leaves(stage_params)[0].shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(STAGE_AXIS, 1) == 1:
    return run_stages_sequentially(stage_fn, stage_params, inputs, extras)
  if mesh.shape[STAGE_AXIS] != num_stages:
    raise ValueError(f"parameters have {num_stages} stages but the mesh's {STAGE_AXIS} axis "
                     f"has {mesh.shape[STAGE_AXIS]} devices")
  microbatches = jax.tree.leaves(inputs)[0].shape[0]
  iterations = microbatches + num_stages - 1
  last = num_stages - 1
  # Stage s sends to s + 1; the last stage's output leaves the loop instead.
  forward = [(s, s + 1) for s in range(last)]

  def schedule(params, inputs, extras):
    layers = split_layers(jax.tree.map(lambda a: a[0], params))  # this device's stage
    stage = jax.lax.axis_index(STAGE_AXIS)
    # Each stage reads (and in the backward pass sums the gradients of) its own
    # copy: declared once here, the gradient's sum over stages is one psum of
    # all microbatches instead of one per iteration.
    inputs = jax.lax.pcast(inputs, STAGE_AXIS, to="varying")
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    received = jax.tree.map(jnp.zeros_like, at(inputs, 0))
    outputs = []
    # A Python loop, unrolled: as a scan, the backward pass's residuals of all
    # iterations are stacked in loop-carried buffers that XLA zero-fills and
    # copies every step (measured on CPU: the largest part of the pipeline's
    # overhead). Compile time grows with m + p − 1.
    for t in range(iterations):
      # Stage s works on microbatch t − s; outside [0, m) it computes filler (the bubble).
      x = select(stage == 0, at(inputs, min(t, microbatches - 1)), received)
      y = stage_fn(layers, x, at(extras, jnp.clip(t - stage, 0, microbatches - 1)), stage)
      if t >= last:  # the last stage finishes microbatch t − (p − 1)
        outputs.append(y)
      received = jax.lax.ppermute(y, STAGE_AXIS, forward)
    return _from_last_stage(outputs, stage, last)

  return stage_map(schedule, stage_params, (inputs, extras), token_specs(inputs))


def circular(stage_fn: StageFn, stage_params, inputs: jax.Array, extras=None) -> jax.Array:
  """Runs ``inputs`` through p stages of v chunks each with the interleaved schedule.

  The L layers are p·v chunks; stage s holds chunks s, s + p, ..., s + (v − 1)·p
  (``stack_layers`` with ``virtual_stages``). A microbatch goes round the ring of
  stages v times, through chunk r·p + s on its r-th visit to stage s; stage
  p − 1 hands it back to stage 0 with the same ``ppermute`` (a cycle). Work is
  taken in groups of p microbatches: item w = g·p·v + r·p + i is microbatch
  g·p + i on its r-th round, so a microbatch comes back to stage 0 exactly when
  stage 0 is due to run its next round, and nothing waits in a buffer
  (Megatron's and MaxText's circular schedule). In iteration t stage s runs item
  t − s: v·m + p − 1 iterations of 1/v of a GPipe iteration's work, the bubble
  (p − 1) / (v·m + p − 1) (``bubble_fraction``).

  Args:
    stage_fn: as for ``gpipe``; ``stage`` is the chunk index r·p + s.
    stage_params: pytree of [p, v, L/(p·v), ...] leaves, split over ``stage``.
    inputs: [m, b, ...] microbatches (or a pytree of them, as for ``gpipe``),
      replicated over ``stage``. If p does not divide m (e.g. one row sampled),
      the chunks run one after another.
    extras: as for ``gpipe``.

  Returns:
    [m, b, ...]: the last chunk's output for every microbatch, replicated over
    ``stage``.
  """
  num_stages, virtual_stages = jax.tree.leaves(stage_params)[0].shape[:2]
  microbatches = jax.tree.leaves(inputs)[0].shape[0]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(STAGE_AXIS, 1) == 1 or microbatches % num_stages:
    # Chunk r·p + s is the (r·p + s)-th stage of the sequential reference.
    chunks = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[2:]),
                          stage_params)
    return run_stages_sequentially(stage_fn, chunks, inputs, extras)
  items = microbatches * virtual_stages
  last = num_stages - 1
  ring = [(s, (s + 1) % num_stages) for s in range(num_stages)]

  def item(w):
    """Work item w -> (round r, microbatch); w may be traced."""
    group, within = w // (num_stages * virtual_stages), w % (num_stages * virtual_stages)
    return within // num_stages, group * num_stages + within % num_stages

  def schedule(params, inputs, extras):
    chunks = jax.tree.map(lambda a: a[0], params)  # this stage's [v, L/(p·v), ...]
    stage = jax.lax.axis_index(STAGE_AXIS)
    inputs = jax.lax.pcast(inputs, STAGE_AXIS, to="varying")
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    received = jax.tree.map(jnp.zeros_like, at(inputs, 0))
    outputs = []
    for t in range(items + last):
      first_round, first_micro = item(min(t, items - 1))  # stage 0's item t (static)
      x = received
      if first_round == 0:  # stage 0 starts a microbatch rather than continue one
        x = select(stage == 0, at(inputs, first_micro), received)
      rnd, micro = item(jnp.clip(t - stage, 0, items - 1))
      layers = split_layers(jax.tree.map(lambda a, r=rnd: a[r], chunks))
      y = stage_fn(layers, x, at(extras, micro), rnd * num_stages + stage)
      if t >= last and item(t - last)[0] == virtual_stages - 1:  # the last chunk, done
        outputs.append(y)
      received = jax.lax.ppermute(y, STAGE_AXIS, ring)
    return _from_last_stage(outputs, stage, last)

  return stage_map(schedule, stage_params, (inputs, extras), token_specs(inputs))
