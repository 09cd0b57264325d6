"""Logical axis names -> mesh axes: where every parameter and activation lives.

Model code names the dimensions of its arrays with logical axes (``batch``,
``seq``, ``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``, and ``stage``,
``layers`` for pipelined layer stacks); it never mentions a mesh axis. This
module is the only place that maps them onto the mesh.

Two tables, as in Levanter's parameter/compute axis mappings:

* ``compute_rules``: where activations live during the step. The batch is split
  over the data axes and the sequence over ``sequence`` (Ulysses); Megatron
  tensor parallelism splits heads, MLP hidden units and the vocabulary over
  ``tensor``; MoE experts are split over ``expert``.
* parameters at rest start from the same tensor-parallel placement, and ZeRO
  then adds the data axes on top (``zero_spec``).

ZeRO is not a table entry because DeepSpeed's contract is "every device holds
1/N of each tensor", whichever dimension that takes: it splits the flattened
tensor. The closest sharded-array equivalent is to split the largest dimension
that divides evenly. A tensor with no such dimension stays replicated, as tiny
tensors do under DeepSpeed's ``stage3_param_persistence_threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxspeed.parallel.mesh import DATA_AXES, spec_axes

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def compute_rules(batch_axes: tuple[str, ...] | None = DATA_AXES) -> LogicalRules:
  """Rules for activations and for the tensor-parallel split of parameters.

  Args:
    batch_axes: where the batch dimension is split; None inside a computation
      already mapped over the data-parallel workers (per-worker gradients).
  """
  return (
      ("batch", batch_axes),
      ("seq", "sequence"),
      ("embed", None),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("kv", None),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      # Pipeline: stacked layer parameters [stage, layers, ...] (interleaved: [stage,
      # virtual, layers, ...]), one stage per device group.
      ("stage", "stage"),
      ("virtual", None),
      ("layers", None),
      ("experts", "expert"),
  )


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules | None = None) -> P:
  """Maps logical names to a ``PartitionSpec``; a mesh axis is used at most once.

  Args:
    names: one logical name (or None) per array dimension.
    rules: defaults to ``compute_rules()``.
  """
  table = dict(compute_rules() if rules is None else rules)
  used: set[str] = set()
  spec = []
  for name in names:
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def _mesh_size(mesh: Mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in spec_axes(axes))


def zero_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Adds the data axes to the largest dimension of ``shape`` they divide evenly.

  Args:
    spec: the tensor-parallel placement of a tensor.
    shape: the tensor's global shape.
    mesh: the mesh; its data axes not already in ``spec`` are the ZeRO group.

  Returns:
    ``spec`` with the group (e.g. ``('data', 'fsdp')``) added to one dimension, or ``spec``
    unchanged if no dimension's local size is divisible by the group size.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  # An axis the tensor already uses (``expert`` for expert weights) is not part
  # of its ZeRO group: the tensor is replicated only over the other data axes.
  used = {a for e in entries for a in spec_axes(e)}
  group = tuple(a for a in DATA_AXES if mesh.shape[a] > 1 and a not in used)
  if not group:
    return spec
  n = _mesh_size(mesh, group)
  local = [size // _mesh_size(mesh, e) for size, e in zip(shape, entries)]
  candidates = [i for i in range(len(shape)) if local[i] % n == 0]
  if not candidates:
    return spec
  dim = max(candidates, key=lambda i: local[i])
  entries[dim] = group + spec_axes(entries[dim])
  return P(*entries)


def named(mesh: Mesh, specs):
  """Turns a pytree of ``PartitionSpec`` into ``NamedSharding`` on ``mesh``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))
