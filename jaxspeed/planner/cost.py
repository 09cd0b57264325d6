"""Predicted step time of a compiled layout on a hardware profile.

Assumptions, stated once:

* **Compute** = the step's FLOPs per device (``Compiled.flops``: what the
  program computes, remat's recomputation and a pipeline's filler iterations
  included, so the bubble is priced here) / (peak FLOP/s of the model's
  dtype x ``achievable_flops_fraction``).
* **Communication**: each collective sends ``Collective.sent_bytes`` per
  device per run (ring algorithms; ``jaxspeed.comm.hlo``), over the slowest
  tier its replica groups cross: a group within ``devices_per_node``
  consecutive devices uses the node's links, else the network. Mesh axes are
  laid out innermost-last (``tensor`` fastest varying), so the innermost axes
  share a node. Plus ``collective_latency`` per run.
* **Overlap**: collectives over the data-parallel axes only (gradient
  reductions, ZeRO's gathers) can run behind the layers' compute, as XLA's
  latency-hiding scheduler does; up to ``overlap_fraction`` of the compute
  time hides them. Collectives over ``tensor``, ``sequence``, ``expert`` and
  ``stage`` sit between dependent operations and are exposed.
* **Memory**: a layout fits when the compiled peak per device (arguments +
  temporaries + outputs not aliased to arguments) is at most the device
  memory.

MFU is the model's FLOPs (``ModelConfig.flops_per_token``, PaLM's formula) per
step over the predicted time and the peak of all devices.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxspeed.comm.hlo import Collective
from jaxspeed.parallel.mesh import DATA_AXES, MESH_AXES
from jaxspeed.planner.compiled import Compiled
from jaxspeed.planner.hardware import Hardware
from jaxspeed.planner.layouts import Layout

OVERLAP_FRACTION = 0.8


TIERS = ("intra", "inter")  # within a node, across nodes
KINDS = ("overlappable", "exposed")  # over the data axes only, or not


@dataclasses.dataclass(frozen=True)
class StepCosts:
  """What a layout's step costs per device, as scalars (so two depths can be extrapolated).

  Attributes:
    flops: FLOPs per device per step.
    peak_bytes: compiled peak memory per device (``Compiled.peak_bytes``).
    comm_bytes, comm_runs: per (tier, kind) (``TIERS`` x ``KINDS``), bytes sent per device
      and collective runs per step.
  """

  flops: float
  peak_bytes: float
  comm_bytes: dict[tuple[str, str], float]
  comm_runs: dict[tuple[str, str], float]

  @staticmethod
  def extrapolate(a: StepCosts, depth_a: int, b: StepCosts, depth_b: int,
                  depth: int) -> StepCosts:
    """Each figure on the line through (depth_a, a) and (depth_b, b), at ``depth`` layers:
    every layer adds the same FLOPs, bytes and collectives."""
    line = lambda x, y: x + (y - x) * (depth - depth_a) / (depth_b - depth_a)
    return StepCosts(line(a.flops, b.flops), line(a.peak_bytes, b.peak_bytes),
                     {k: line(a.comm_bytes[k], b.comm_bytes[k]) for k in a.comm_bytes},
                     {k: line(a.comm_runs[k], b.comm_runs[k]) for k in a.comm_runs})


def step_costs(layout: Layout, compiled: Compiled, devices_per_node: int) -> StepCosts:
  """The ``StepCosts`` of a compiled layout, its collectives sorted by tier and kind."""
  shape = layout.shape
  keys = [(t, k) for t in TIERS for k in KINDS]
  sent, runs = dict.fromkeys(keys, 0.0), dict.fromkeys(keys, 0.0)
  for c in compiled.collectives:
    tier = "inter" if c.crosses(devices_per_node) else "intra"
    kind = "overlappable" if collective_axes(c, shape) <= set(DATA_AXES) else "exposed"
    sent[tier, kind] += c.sent_bytes * c.runs
    runs[tier, kind] += c.runs
  return StepCosts(compiled.flops, compiled.peak_bytes, sent, runs)


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The cost model's figures for one layout (seconds per step, bytes per device)."""

  layout: Layout
  compute_s: float
  exposed_comm_s: float
  hidden_comm_s: float
  step_s: float
  peak_bytes: int
  fits: bool
  bytes_intra_node: float
  bytes_inter_node: float
  mfu: float


def collective_axes(collective: Collective, shape: dict[str, int]) -> set[str]:
  """The mesh axes along which a collective's group members differ."""
  sizes = [shape[a] for a in MESH_AXES]
  axes = set()
  for group in collective.groups:
    coords = np.array(np.unravel_index(np.asarray(group), sizes)).T
    axes |= {MESH_AXES[i] for i in np.flatnonzero((coords != coords[0]).any(axis=0))}
  return axes


def predict(layout: Layout, costs: StepCosts, hardware: Hardware, dtype: str,
            model_flops_per_step: float, overlap_fraction: float = OVERLAP_FRACTION
            ) -> Prediction:
  """The predicted step time of ``layout`` on ``hardware`` (module docstring)."""
  devices = int(np.prod(list(layout.shape.values())))
  peak = hardware.peak_flops[dtype]
  compute = costs.flops / (peak * hardware.achievable_flops_fraction)
  bandwidth = {"intra": hardware.intra_node_bandwidth, "inter": hardware.inter_node_bandwidth}
  seconds = {key: costs.comm_bytes[key] / bandwidth[key[0]]
             + hardware.collective_latency * costs.comm_runs[key] for key in costs.comm_bytes}
  overlappable = sum(v for (_, kind), v in seconds.items() if kind == "overlappable")
  exposed = sum(v for (_, kind), v in seconds.items() if kind == "exposed")
  hidden = min(overlappable, overlap_fraction * compute)
  step = compute + exposed + overlappable - hidden
  total = lambda tier: sum(v for (t, _), v in costs.comm_bytes.items() if t == tier)
  return Prediction(layout, compute, exposed + overlappable - hidden, hidden, step,
                    int(costs.peak_bytes), costs.peak_bytes <= hardware.memory_bytes,
                    total("intra"), total("inter"),
                    model_flops_per_step / (step * peak * devices))


class NoLayoutFits(ValueError):
  """No layout's compiled peak memory fits the device; the message lists the closest."""


def rank(predictions: list[Prediction], memory_bytes: float) -> list[Prediction]:
  """The layouts that fit, fastest first.

  Raises:
    NoLayoutFits: none fits; names the three with the least memory and their GiB.
  """
  fitting = sorted((p for p in predictions if p.fits), key=lambda p: p.step_s)
  if not fitting:
    closest = sorted(predictions, key=lambda p: p.peak_bytes)[:3]
    raise NoLayoutFits(f"no layout of {len(predictions)} fits {memory_bytes / 2**30:.2f} GiB "
                       "per device; closest: " + "; ".join(
                           f"{p.layout.name} needs {p.peak_bytes / 2**30:.2f} GiB"
                           for p in closest))
  return fitting
