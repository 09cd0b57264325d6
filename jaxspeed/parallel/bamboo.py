"""Bamboo's redundancy: survive the loss of a pipeline stage without a checkpoint restart.

Thorpe et al., "Bamboo: Making Preemptible Instances Resilient for Affordable
Training of Large DNNs" (NSDI 2023): each pipeline stage also holds its
successor's layers and optimizer state (stage s holds stage (s + 1) mod p's;
the last holds stage 0's), so when a stage's machine is preempted its
predecessor has everything the lost stage held, and training goes on with
p − 1 stages instead of restarting from the newest checkpoint.

Here:

* ``successor_replicas(state)``: the replicas, refreshed after every optimizer
  step: each leaf split over ``stage`` rolled one stage down the ring (one
  collective-permute of the stage's parameters and optimizer state per step;
  its bytes are what redundancy costs, with one more copy of them in memory).
* ``recover(setup, state, replicas, lost_stage)``: the survivors' shards and
  the replica of the lost stage make the whole state again; it is restacked
  for p − 1 stages (``jaxspeed.checkpoint.layout.convert``) and placed on the
  surviving devices, with a new train step built for them. Nothing is read
  from the lost stage's devices; nothing is read from disk.

Bamboo also runs the successor's forward pass redundantly in the pipeline
bubbles, so that a stage lost in the middle of an iteration can be taken over
mid-iteration. Recovery here happens between optimizer steps (the step in
flight is redone), so that redundant computation is not run.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeed.checkpoint.layout import convert, flatten_with_paths, place
from jaxspeed.parallel.mesh import MESH_AXES, spec_axes
from jaxspeed.parallel.pipeline import STAGE_AXIS

Path = tuple[str, ...]


def _stage_dim(leaf: jax.Array) -> int | None:
  """The dimension of ``leaf`` split over ``stage``, if any."""
  spec = getattr(leaf.sharding, "spec", ())
  return next((d for d, entry in enumerate(spec) if STAGE_AXIS in spec_axes(entry)), None)


def stage_split_leaves(state: Any) -> dict[Path, jax.Array]:
  """``{path: leaf}`` of the leaves of ``state`` split over ``stage`` (the replicated part)."""
  return {path: leaf for path, leaf in flatten_with_paths(state).items()
          if _stage_dim(leaf) is not None}


def replica_refresh(leaves: dict[Path, jax.Array]):
  """The jitted ``{path: leaf} -> {path: replica}`` of ``successor_replicas``."""
  dims = {path: _stage_dim(leaf) for path, leaf in leaves.items()}
  return jax.jit(lambda values: {p: jnp.roll(v, -1, axis=dims[p]) for p, v in values.items()},
                 out_shardings={path: leaf.sharding for path, leaf in leaves.items()})


def successor_replicas(state: Any) -> dict[Path, jax.Array]:
  """Each stage's copy of its successor's share of ``state``.

  Args:
    state: a train state on a mesh with a ``stage`` axis.

  Returns:
    ``{path: replica}`` for every leaf split over ``stage``: replica[s] =
    leaf[(s + 1) mod p] along the stage dimension, placed like the leaf (so
    stage s's devices hold stage s + 1's values).
  """
  leaves = stage_split_leaves(state)
  return replica_refresh(leaves)(leaves)


def _stage_of_devices(mesh) -> dict[Any, int]:
  """Device -> its index on the ``stage`` axis of ``mesh``."""
  position = MESH_AXES.index(STAGE_AXIS)
  return {device: index[position] for index, device in np.ndenumerate(mesh.devices)}


def _assemble(leaf: jax.Array, keep, replica: jax.Array | None, lost: int,
              num_stages: int) -> np.ndarray:
  """``leaf`` as one host array from the shards on the ``keep`` devices, the lost stage's
  slice from ``replica``'s shards on its predecessor's devices."""
  value = np.zeros(leaf.shape, leaf.dtype)
  filled = np.zeros(leaf.shape, bool)
  for shard in leaf.addressable_shards:
    if keep(shard.device):
      value[shard.index] = np.asarray(shard.data)
      filled[shard.index] = True
  if replica is not None:
    dim, holder = _stage_dim(leaf), (lost - 1) % num_stages
    for shard in replica.addressable_shards:
      index = list(shard.index)
      if index[dim] == slice(holder, holder + 1):
        index[dim] = slice(lost, lost + 1)
        value[tuple(index)] = np.asarray(shard.data)
        filled[tuple(index)] = True
  if not filled.all():
    raise ValueError("the surviving devices and the replicas do not hold the whole state")
  return value


def recover(setup, state: Any, replicas: dict[Path, jax.Array], lost_stage: int):
  """The run without ``lost_stage``: a new ``Setup`` on the surviving devices, with
  ``parallel.stage`` = p − 1, and the state rebuilt without touching the lost devices.

  Args:
    setup: the running ``jaxspeed.training.Setup`` (``parallel.stage`` = p > 1).
    state: its train state after the last completed step.
    replicas: ``successor_replicas(state)`` of that same step.
    lost_stage: the stage whose devices are gone.

  Returns:
    (new setup, new state): the same model, optimizer state, step and data
    position, with the layers restacked for p − 1 stages.

  Raises:
    ValueError: p − 1 stages do not split the layers evenly, or a replica is missing.
  """
  config = copy.deepcopy(setup.config)
  num_stages = setup.mesh.shape[STAGE_AXIS]
  if not 0 <= lost_stage < num_stages or num_stages < 2:
    raise ValueError(f"lost_stage must be a stage in [0, {num_stages}), got {lost_stage}")
  if config.model.num_layers % (num_stages - 1):
    raise ValueError(f"{num_stages - 1} stages do not split model.num_layers="
                     f"{config.model.num_layers} evenly; no layout to recover into")
  stage_of = _stage_of_devices(setup.mesh)
  keep = lambda device: stage_of[device] != lost_stage
  survivors = [d for d in setup.mesh.devices.flat if keep(d)]
  leaves = {}
  for path, leaf in flatten_with_paths(state).items():
    replica = replicas.get(path)
    if replica is None and _stage_dim(leaf) is not None:
      raise ValueError(f"no replica of {'/'.join(path)}")
    leaves[path] = _assemble(leaf, keep, replica, lost_stage, num_stages)
  config.parallel.stage = num_stages - 1
  config.fit_parallel = False
  if num_stages == 2:  # one stage left: no pipeline, no schedule
    config.pipeline.schedule = "gpipe"
  from jaxspeed.training.trainer import build  # the trainer builds on this package

  new_setup = build(config, devices=survivors)
  new_setup.train_data.restore(setup.train_data.state)
  target = new_setup.abstract_state()
  return new_setup, place(convert(leaves, flatten_with_paths(target)), target)
