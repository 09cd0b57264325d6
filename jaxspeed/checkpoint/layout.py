"""Layout-dependent train state, converted when a checkpoint is restored into another layout.

Most of the state does not depend on the layout: a parameter or an Adam
moment has one global shape whatever the mesh, ZeRO stage or device count,
and orbax restores it into any new sharding. That covers every change of the
``data``, ``fsdp``, ``tensor``, ``sequence`` and ``expert`` axes and of the
ZeRO stage: expert weights keep their expert axis ``[E, ...]``, so each
expert's weights and Adam moments stay together under any expert-parallel
degree. Two kinds of leaves do depend on the layout, and are converted here
(the state is first read as host arrays in its saved structure):

* **Pipeline stacking.** With ``parallel.stage = p`` the L ``layer_i``
  subtrees of the parameters, and of every optimizer moment that mirrors them,
  are one ``layers`` subtree of ``[..., p, L/p, ...]`` leaves
  (``jaxspeed.parallel.pipeline.stack_layers``). Saved leaves are unstacked
  into the L layers, then stacked again for the new ``p'`` (or left unstacked
  without a pipeline). This is exact: the values are only moved.
* **Per-worker state of the 1-bit optimizers** when the number of
  data-parallel workers P changes (``jaxspeed.comm.workers``):

  - error feedback (``errors``: worker ``[rows, n_pad]`` and server
    ``[rows, n_pad / P]``, one row per device, data-parallel index major) is
    re-split so that the correction still pending is kept. The workers'
    messages are averaged, so their errors enter the next average only as
    their mean: each of the P' new workers gets the mean of the P saved
    worker errors (for its tensor-parallel block). The server errors are
    chunks of one vector, server j holding chunk j of P: they are joined and
    cut again into P' chunks. Vectors are padded to a multiple that depends
    on P; the pad positions carry no data and are cut or zero-filled. When
    the tensor-parallel degree changes too, each device's block of every
    tensor changes and no row maps onto a new one: the errors are reset to
    zero, losing one step's compression error (as the 0/1 Adam schedule
    does when phase 2 starts);
  - per-worker momenta and accumulated updates ``[P, ...]`` (0/1 Adam) are
    averaged over the P workers and the average is given to each of the P'
    new ones. During variance updates the rows are equal, so this is exact;
    during local steps it is what an uncompressed synchronization would do,
    with the accumulated learning-rate sum kept.

  Error feedback is restored as saved only when P and its shape are unchanged.

Anything else that differs (a leaf missing on one side, another shape or
dtype) is an error naming the leaf: the model or the optimizer changed.

A converted restore reads the whole state into each process's host memory
before placing it; a restore into the saved shapes streams shards as usual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxspeed.parallel.pipeline import CIRCULAR, STACKED, is_layer_name, layer_name

Path = tuple[str, ...]

ERRORS = "errors"  # the 1-bit optimizers' error-feedback field (``Errors``)
PARAMS = "params"
def path_tuple(key_path) -> Path:
  """A jax key path (dict keys, attributes, indices) as strings, as orbax names them."""
  parts = []
  for entry in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return tuple(parts)


def flatten_with_paths(tree) -> dict[Path, Any]:
  """``{path: leaf}`` of a pytree (a restored checkpoint or an abstract state)."""
  return {path_tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stack_position(path: Path) -> int | None:
  """Where the stacked-layers key (``layers`` or ``circular_layers``) is in ``path``, if any."""
  for key in (STACKED, CIRCULAR):
    if key in path:
      return path.index(key)
  return None


def _stacked_dims(path: Path) -> int:
  """2 for ``[p, L/p]`` stacking, 3 for the interleaved ``[p, v, L/(p·v)]``."""
  return 3 if CIRCULAR in path else 2


def _leading_axes(path: Path, shape: tuple[int, ...], leaves: Mapping[Path, Any]) -> int:
  """Axes before the layer axes of a leaf under ``layers``: 1 for a per-worker ``[P, ...]``.

  Read from the parameter the leaf mirrors (same path from ``layers`` on).
  """
  at = _stack_position(path)
  param = leaves.get((PARAMS, *path[at:]))
  return 0 if param is None or path[0] == PARAMS else len(shape) - len(param.shape)


def unstack(leaves: dict[Path, np.ndarray]) -> dict[Path, np.ndarray]:
  """Pipeline-stacked leaves (``stack_layers``: ``[..., p, L/p, ...]`` under ``layers``,
  ``[..., p, v, L/(p·v), ...]`` under ``circular_layers``) -> L ``layer_i`` leaves."""
  out = {}
  for path, value in leaves.items():
    at = _stack_position(path)
    if at is None:
      out[path] = value
      continue
    lead = _leading_axes(path, value.shape, leaves)
    dims = _stacked_dims(path)
    if dims == 3:  # [p, v, c] -> [v, p, c]: chunk r·p + s in order
      value = np.swapaxes(value, lead, lead + 1)
    num_layers = math.prod(value.shape[lead:lead + dims])
    flat = value.reshape(*value.shape[:lead], num_layers, *value.shape[lead + dims:])
    for i in range(num_layers):
      out[(*path[:at], layer_name(i), *path[at + 1:])] = np.take(flat, i, axis=lead)
  return out


def _stacked(path: Path, shape: tuple[int, ...], lead: int,
             canonical: Mapping[Path, np.ndarray]) -> np.ndarray | None:
  """The target stacked leaf (see ``unstack``) from canonical ``layer_i`` leaves."""
  at = _stack_position(path)
  dims = _stacked_dims(path)
  num_layers = math.prod(shape[lead:lead + dims])
  layers = [canonical.get((*path[:at], layer_name(i), *path[at + 1:])) for i in range(num_layers)]
  if any(x is None for x in layers):
    return None
  stacked = np.stack(layers, axis=lead)
  if dims == 2:
    return stacked.reshape(*stacked.shape[:lead], *shape[lead:lead + 2],
                           *stacked.shape[lead + 1:])
  p, v, c = shape[lead:lead + 3]
  chunks = stacked.reshape(*stacked.shape[:lead], v, p, c, *stacked.shape[lead + 1:])
  return np.swapaxes(chunks, lead, lead + 1)


class LayoutError(ValueError):
  """A saved state that no conversion rule maps onto the requested one."""


def convert(saved: dict[Path, np.ndarray], target: dict[Path, jax.ShapeDtypeStruct]
            ) -> dict[Path, np.ndarray]:
  """The saved leaves, converted to the target's layout (module docstring).

  Args:
    saved: the checkpoint's leaves by path, as host arrays.
    target: the requested state's leaves by path (shapes and dtypes).

  Returns:
    One host array per target path, of the target's shape and dtype.

  Raises:
    LayoutError: naming the first leaf no rule converts (a different model or optimizer).
  """
  canonical = unstack(saved)
  used: set[Path] = set()
  out = {}
  for path, want in target.items():
    name = "/".join(path)
    if _stack_position(path) is not None:
      lead = _leading_axes(path, want.shape, target)
      value = _stacked(path, want.shape, lead, canonical)
      at = _stack_position(path)
      used.update(k for k in canonical if k[:at] == path[:at] and k[at + 1:] == path[at + 1:]
                  and is_layer_name(k[at]))
    else:
      value = canonical.get(path)
      used.add(path)
    if value is None:
      raise LayoutError(f"the checkpoint has no {name}")
    if np.dtype(value.dtype) != np.dtype(want.dtype):
      raise LayoutError(f"{name} is {value.dtype} in the checkpoint, {want.dtype} here")
    if ERRORS in path and path[0] != PARAMS and _workers(path, saved) != _workers(path, target):
      value = _resplit_errors(path, value, _workers(path, saved)[0],
                              _workers(path, target)[0], tuple(want.shape))
    elif value.shape != tuple(want.shape):
      value = _per_worker(name, path, value, tuple(want.shape), target)
    out[path] = value
  unused = sorted("/".join(k) for k in canonical.keys() - used)
  if unused:
    raise LayoutError(f"the checkpoint has {unused[0]}"
                      f"{f' (and {len(unused) - 1} more)' if len(unused) > 1 else ''}, "
                      "which this config does not")
  return out


def _workers(path: Path, leaves: Mapping[Path, Any]) -> tuple[int | None, ...]:
  """P and the buffer shape of an error-feedback leaf: worker ``[rows, n_pad]``, server
  ``[rows, n_pad / P]``."""
  worker, server = (leaves.get((*path[:-1], name)) for name in ("worker", "server"))
  paired = worker is not None and server is not None and server.shape[1]
  return (worker.shape[1] // server.shape[1] if paired else None, *leaves[path].shape)


def _resplit_errors(path: Path, value: np.ndarray, saved_workers: int | None,
                    workers: int | None, shape: tuple[int, int]) -> np.ndarray:
  """Error feedback of ``saved_workers`` workers for ``workers`` (module docstring).

  Rows are devices, data-parallel index major: row ``w * T + t`` is worker w's
  tensor-parallel block t. With another T (or an unpaired buffer) the errors reset.
  """
  rows, size = shape
  if saved_workers is None or workers is None or (
      value.shape[0] // saved_workers != rows // workers):
    return np.zeros(shape, value.dtype)
  blocks = rows // workers  # T, unchanged
  if path[-1] == "worker":  # [P*T, n_pad] -> the mean over workers, per block
    mean = _fit(value.reshape(saved_workers, blocks, -1).mean(axis=0), size)
    return np.broadcast_to(mean, (workers, blocks, size)).reshape(shape).copy()
  # server [P*T, n_pad/P]: per block, the P chunks joined, then cut into P' chunks.
  chunk = value.shape[1]
  joined = value.reshape(saved_workers, blocks, chunk).transpose(1, 0, 2).reshape(blocks, -1)
  cut = _fit(joined, workers * size).reshape(blocks, workers, size)
  return cut.transpose(1, 0, 2).reshape(shape)


def _fit(x: np.ndarray, size: int) -> np.ndarray:
  """``x [..., n]`` cut or zero-padded to ``[..., size]`` (the tail is padding)."""
  if x.shape[-1] >= size:
    return x[..., :size]
  return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def _mirrored_param(path: Path, leaves: Mapping[Path, Any]) -> Any:
  """The parameter an optimizer leaf mirrors (the longest path suffix naming one), or None."""
  for start in range(1, len(path)):
    param = leaves.get((PARAMS, *path[start:]))
    if param is not None:
      return param
  return None


def _per_worker(name: str, path: Path, value: np.ndarray, shape: tuple[int, ...],
                target: Mapping[Path, Any]) -> np.ndarray:
  """The 1-bit per-worker rules for an optimizer leaf whose shape changed with the workers."""
  param = _mirrored_param(path, target) if path[0] != PARAMS else None
  per_worker = param is not None and shape[1:] == tuple(param.shape)
  if per_worker and value.shape[1:] == shape[1:]:
    return np.broadcast_to(value.mean(axis=0, dtype=value.dtype), shape).copy()
  raise LayoutError(f"{name} has shape {value.shape} in the checkpoint, {shape} here")


def place(values: dict[Path, np.ndarray], target: Any) -> Any:
  """The target pytree (ShapeDtypeStructs with shardings) filled with ``values`` by path."""
  def put(key_path, want):
    value = values[path_tuple(key_path)]
    return jax.make_array_from_callback(want.shape, want.sharding, lambda index: value[index])
  return jax.tree_util.tree_map_with_path(put, target)
