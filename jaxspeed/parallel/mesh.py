"""One named device mesh for every kind of parallelism.

The axes are fixed, in this order, from outermost (slowest interconnect, least
communication) to innermost (fastest, most communication):

  data, fsdp, stage, expert, sequence, tensor

Unused axes have size 1, so every sharding rule can name any axis on any mesh.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
from jax.sharding import AxisType, Mesh

from jaxspeed.errors import ConfigError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "stage", "expert", "sequence", "tensor")
# Axes that split the batch and ZeRO state. ``expert`` is one of them, as in
# DeepSpeed-MoE, whose expert-parallel groups are carved out of the
# data-parallel world: every device routes its own rows, dense parameters are
# replicated (or ZeRO-split) over all of these axes, and expert weights are
# split over ``expert`` and replicated over the rest (see rules.zero_spec).
DATA_AXES: tuple[str, ...] = ("data", "fsdp", "expert")


def spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one ``PartitionSpec`` entry: None, an axis name or a tuple of them."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def use_cpu_devices(n: int) -> None:
  """Makes the CPU backend expose ``n`` virtual devices.

  Must run before JAX initializes its backends (before the first computation or
  device query). Has no effect on GPU/TPU, where the real devices are used.
  """
  if n < 1:
    raise ConfigError("cpu_devices", f"must be >= 1, got {n}")
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={n}")
  os.environ["XLA_FLAGS"] = " ".join(flags)
  jax.config.update("jax_num_cpu_devices", n)


def resolve_mesh_shape(parallel: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Validates ``config.parallel`` and fills in the one ``-1`` axis, if any.

  Args:
    parallel: axis name -> size; missing axes are 1, at most one axis may be -1.
    num_devices: total number of devices the mesh must cover.

  Returns:
    A dict over all of ``MESH_AXES`` whose product is ``num_devices``.
  """
  unknown = sorted(set(parallel) - set(MESH_AXES))
  if unknown:
    raise ConfigError(f"parallel.{unknown[0]}",
                      f"unknown mesh axis; allowed axes are {', '.join(MESH_AXES)}")
  shape = {axis: int(parallel.get(axis, 1)) for axis in MESH_AXES}
  fill = [axis for axis, size in shape.items() if size == -1]
  for axis, size in shape.items():
    if size == 0 or size < -1:
      raise ConfigError(f"parallel.{axis}", f"must be a positive size or -1, got {size}")
  if len(fill) > 1:
    raise ConfigError(f"parallel.{fill[1]}",
                      f"only one axis may be -1, got -1 on {', '.join(fill)}")
  fixed = math.prod(size for size in shape.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise ConfigError(f"parallel.{fill[0]}",
                        f"cannot fill: the other axes multiply to {fixed}, "
                        f"which does not divide {num_devices} devices")
    shape[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    sizes = " x ".join(f"{a}={s}" for a, s in shape.items() if s != 1) or "all 1"
    raise ConfigError("parallel",
                      f"mesh {sizes} has {fixed} devices but {num_devices} are available; "
                      "set one axis to -1 to fill the rest")
  return shape


def make_mesh(parallel: Mapping[str, int], devices=None) -> Mesh:
  """Builds the named mesh from ``config.parallel``.

  Axes are ``Auto``: sharding is expressed with ``jax.jit`` in/out shardings
  and ``with_sharding_constraint`` and XLA's SPMD partitioner inserts the
  collectives; explicit collectives live only inside ``jax.shard_map``.
  """
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(parallel, len(devices))
  return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch is split (``data`` x ``fsdp`` x ``expert``)."""
  return math.prod(mesh.shape[a] for a in DATA_AXES)
