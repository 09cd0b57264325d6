"""The layouts of a model on N devices that the config rules accept.

A layout is a size for each mesh axis (``jaxspeed.parallel.mesh.MESH_AXES``),
a ZeRO stage, a remat policy and a microbatch count. ``enumerate_layouts``
lists every factorization of N over the axes, crossed with the options, and
keeps those ``jaxspeed.config.validate`` accepts (divisibility of heads,
layers, batch and experts; the compatibility table), so a layout the config
rejects is never compiled.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence

import ml_collections

from jaxspeed.config import validate
from jaxspeed.errors import ConfigError
from jaxspeed.parallel.mesh import MESH_AXES

# Axes a dense model can use; ``expert`` only with MoE layers. ``fsdp`` is left out: ZeRO
# splits over data x fsdp alike, so it would list each data-parallel layout twice.
DENSE_AXES = ("data", "stage", "sequence", "tensor")


@dataclasses.dataclass(frozen=True, order=True)
class Layout:
  """One way to run a model on N devices."""

  axes: tuple[tuple[str, int], ...]  # (axis, size) over MESH_AXES, sizes multiplying to N
  zero_stage: int
  remat: str
  microbatches: int

  @property
  def shape(self) -> dict[str, int]:
    return dict(self.axes)

  @property
  def name(self) -> str:
    """E.g. ``fsdp8.tensor2 z3 remat=full m2``."""
    mesh = ".".join(f"{a}{s}" for a, s in self.axes if s > 1) or "single"
    return f"{mesh} z{self.zero_stage} remat={self.remat} m{self.microbatches}"


def apply_layout(config: ml_collections.ConfigDict, layout: Layout) -> ml_collections.ConfigDict:
  """A copy of ``config`` laid out as ``layout``."""
  config = copy.deepcopy(config)
  config.parallel.update(layout.shape)
  config.zero.stage = layout.zero_stage
  config.model.remat = layout.remat
  config.microbatches = layout.microbatches
  config.fit_parallel = False
  return config


def factorizations(n: int, parts: int) -> Iterator[tuple[int, ...]]:
  """Every ordered tuple of ``parts`` positive integers whose product is ``n``."""
  if parts == 1:
    yield (n,)
    return
  for first in (d for d in range(1, n + 1) if n % d == 0):
    for rest in factorizations(n // first, parts - 1):
      yield (first, *rest)


def enumerate_layouts(config: ml_collections.ConfigDict, num_devices: int, *,
                      axes: Sequence[str] = DENSE_AXES, zero_stages: Sequence[int] = (1, 3),
                      remats: Sequence[str] = ("none", "full"),
                      microbatches: Sequence[int] = (1, 4),
                      max_sizes: dict[str, int] | None = None
                      ) -> tuple[list[Layout], dict[Layout, str]]:
  """The layouts of ``config`` on ``num_devices`` devices the config rules accept.

  Args:
    config: the model and run (its ``parallel``, ``zero.stage``, ``model.remat``
      and ``microbatches`` are replaced per layout).
    num_devices: N.
    axes: the mesh axes to split over; the others stay 1.
    zero_stages, remats, microbatches: the options crossed with every mesh.
    max_sizes: an upper bound per axis (e.g. ``{"tensor": 8}``: tensor
      parallelism within a node).

  Returns:
    (accepted layouts in order, {rejected layout: the config error}).
  """
  max_sizes = max_sizes or {}
  accepted, rejected = [], {}
  for sizes in factorizations(num_devices, len(axes)):
    shape = dict(zip(axes, sizes, strict=True))
    if any(shape[a] > max_sizes.get(a, num_devices) for a in axes):
      continue
    full = tuple((a, shape.get(a, 1)) for a in MESH_AXES)
    for zero, remat, micro in itertools.product(zero_stages, remats, microbatches):
      layout = Layout(full, zero, remat, micro)
      try:
        validate(apply_layout(config, layout), num_devices)
      except ConfigError as error:
        rejected[layout] = str(error)
        continue
      accepted.append(layout)
  return accepted, rejected


def device_count(layout: Layout) -> int:
  return math.prod(layout.shape.values())
