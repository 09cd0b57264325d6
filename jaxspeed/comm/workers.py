"""Per-worker arrays and their reductions over the data-parallel workers.

Optimizers that communicate on their own (the 1-bit family) see each
data-parallel worker's local values as one global array with a leading worker
axis, ``[P, ...]``, whose row w lives on worker w. ``WorkerGroup`` reduces such
arrays exactly (a mean, which XLA lowers to an all-reduce) or with the 1-bit
compressed all-reduce, either over the mesh's data axes (``jax.shard_map``) or
simulated in one process (``jax.vmap`` over the worker axis, no mesh).

Under tensor parallelism every device compresses its own block of each tensor,
as each Megatron rank does under DeepSpeed, so error-feedback buffers are per
device: ``[rows, n_pad]`` with one row per device of the mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxspeed.comm.onebit_allreduce import ErrorFeedback, compressed_allreduce, padded_size
from jaxspeed.parallel.mesh import DATA_AXES, spec_axes

SIMULATED_AXIS = "workers"

Errors = tuple[ErrorFeedback, ...]



@dataclasses.dataclass(frozen=True)
class WorkerGroup:
  """The P data-parallel workers, on a mesh or simulated in one process.

  Attributes:
    world: P.
    mesh: the device mesh, or None to simulate P workers with ``vmap``.
    param_specs: tensor-parallel ``PartitionSpec`` of every parameter (mesh only;
      they must not use the data axes).
  """

  world: int
  mesh: Mesh | None = None
  param_specs: Any = None

  @classmethod
  def on_mesh(cls, mesh: Mesh, param_specs) -> WorkerGroup:
    return cls(math.prod(mesh.shape[a] for a in DATA_AXES), mesh, param_specs)

  @property
  def rows(self) -> int:
    """Rows of the per-device buffers (error feedback)."""
    return self.world if self.mesh is None else self.mesh.size

  # ---- shapes and shardings

  def _local_shape(self, shape, spec) -> tuple[int, ...]:
    if self.mesh is None:
      return tuple(shape)
    entries = list(spec) + [None] * (len(shape) - len(spec))
    return tuple(size // math.prod(self.mesh.shape[a] for a in spec_axes(e))
                 for size, e in zip(shape, entries))

  def _local_sizes(self, params) -> list[int]:
    specs = self._specs_like(params)
    return [math.prod(self._local_shape(p.shape, s)) for p, s in
            zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=_is_spec))]

  def _specs_like(self, tree):
    if self.param_specs is None:
      return jax.tree.map(lambda _: P(), tree)
    return self.param_specs

  def error_feedback(self, params, fused: bool = False) -> Errors:
    """Zero error feedback for ``params``: one per tensor, or one for all if ``fused``."""
    sizes = self._local_sizes(params)
    sizes = [sum(sizes)] if fused else sizes
    return tuple(ErrorFeedback(jnp.zeros((self.rows, padded_size(n, self.world)), jnp.float32),
                               jnp.zeros((self.rows, padded_size(n, self.world) // self.world),
                                         jnp.float32))
                 for n in sizes)

  def stacked_spec(self, spec: P) -> P:
    """Where a per-worker array [P, *shape] lives: row w on worker w."""
    return P(DATA_AXES, *spec)

  def error_spec(self) -> P:
    """Where error buffers [rows, n] live: one row per device."""
    return P() if self.mesh is None else P(tuple(self.mesh.axis_names))

  def error_specs(self, errors: Errors):
    return jax.tree.map(lambda _: self.error_spec(), errors)

  def error_feedback_specs(self, param_specs, fused: bool = False) -> Errors:
    """Specs of ``error_feedback(params, fused)`` given the parameters' specs."""
    num = 1 if fused else len(jax.tree.leaves(param_specs, is_leaf=_is_spec))
    return (ErrorFeedback(self.error_spec(), self.error_spec()),) * num

  # ---- reductions

  def mean(self, stacked):
    """Exact average over workers: ``[P, ...] -> [...]`` (an all-reduce on a mesh)."""
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)

  def compressed_mean(self, stacked, errors: Errors, fused: bool = False):
    """1-bit average over workers with error feedback.

    Args:
      stacked: pytree of per-worker arrays [P, *shape].
      errors: from ``error_feedback`` with the same ``fused``.
      fused: compress all tensors as one vector with one scale (1-bit LAMB)
        instead of one scale per tensor (1-bit Adam).

    Returns:
      (pytree of averages [*shape], identical on every worker; new errors).
      With one worker the average is the worker's own value, exactly, and the
      errors stay as they are: like DeepSpeed, which skips compression at world
      size 1, a single worker's update equals the uncompressed one.
    """
    if self.world == 1:
      return self.identical_rows(stacked), errors
    leaves, treedef = jax.tree.flatten(stacked)

    def per_worker(local_leaves, local_errors):
      flat = [x.reshape(-1) for x in local_leaves]
      if fused:
        sizes = np.cumsum([f.shape[0] for f in flat])[:-1]
        flat = [jnp.concatenate(flat)]
      means, new_errors = compressed_allreduce(flat, local_errors, self._axis_name(), self.world)
      if fused:
        means = jnp.split(means[0], sizes)
      return [m.reshape(x.shape) for m, x in zip(means, local_leaves)], tuple(new_errors)

    if self.mesh is None:
      means, errors = jax.vmap(per_worker, axis_name=SIMULATED_AXIS)(leaves, errors)
      return treedef.unflatten([m[0] for m in means]), errors

    def per_device(local_leaves, local_errors):
      rows = [x[0] for x in local_leaves]
      means, new_errors = per_worker(rows, jax.tree.map(lambda e: e[0], local_errors))
      return means, jax.tree.map(lambda e: e[None], new_errors)

    specs = jax.tree.leaves(self.param_specs, is_leaf=_is_spec)
    error_specs = self.error_specs(errors)
    means, errors = jax.shard_map(
        per_device, mesh=self.mesh,
        in_specs=([self.stacked_spec(s) for s in specs], error_specs),
        out_specs=(specs, error_specs), check_vma=False)(leaves, errors)
    return treedef.unflatten(means), errors

  def identical_rows(self, stacked):
    """``[P, ...] -> [...]`` for per-worker arrays whose rows are known to be equal.

    Each worker keeps its own row, so nothing is communicated; the caller
    guarantees the rows agree (e.g. a momentum that was just all-reduced).
    """
    if self.mesh is None:
      return jax.tree.map(lambda x: x[0], stacked)
    leaves, treedef = jax.tree.flatten(stacked)
    specs = jax.tree.leaves(self.param_specs, is_leaf=_is_spec)
    rows = jax.shard_map(lambda xs: [x[0] for x in xs], mesh=self.mesh,
                         in_specs=([self.stacked_spec(s) for s in specs],), out_specs=specs,
                         check_vma=False)(leaves)
    return treedef.unflatten(rows)

  def _axis_name(self):
    return SIMULATED_AXIS if self.mesh is None else DATA_AXES


def _is_spec(x) -> bool:
  return isinstance(x, P)
