"""What the compiled train step of a layout states about itself, without running it.

Each layout's train step is built and compiled ahead of time on virtual
devices from abstract inputs (``Setup.abstract_state``: no parameter is
materialized). The compiled program gives per-device memory
(``memory_analysis``), FLOPs (``cost_analysis``) and every collective with
its replica groups and bytes (``jaxspeed.comm.hlo``).

XLA's ``cost_analysis`` counts the body of a while loop once, whatever its trip
count. A step's only loop is the scan over gradient-accumulation microbatches,
which does the same arithmetic as one larger batch; so FLOPs are read from the
layout compiled with one microbatch (pipelines unroll their microbatches, so
theirs are complete at any count). Collectives inside the loop are counted
once per trip (``Collective.runs``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from jaxspeed.comm.hlo import Collective, collectives
from jaxspeed.planner.layouts import Layout, apply_layout


@dataclasses.dataclass(frozen=True)
class Compiled:
  """Per-device figures of one layout's compiled train step.

  Attributes:
    argument_bytes, temp_bytes, output_bytes, alias_bytes: ``memory_analysis``.
    flops: FLOPs per device per step (module docstring).
    collectives: every collective instruction, with its runs per step.
    compile_seconds: how long lowering and compiling took.
  """

  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  flops: float
  collectives: tuple[Collective, ...]
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """Arguments + temporaries + outputs not aliased to an argument (donated state)."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["collectives"] = [[c.op, c.result_bytes, c.groups, c.runs] for c in self.collectives]
    return out

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> Compiled:
    ops = tuple(Collective(op, size, tuple(map(tuple, groups)), runs)
                for op, size, groups, runs in data["collectives"])
    return cls(**{**data, "collectives": ops})


def compile_step(config: ml_collections.ConfigDict, devices) -> tuple[Any, float]:
  """The compiled train step of ``config`` on ``devices`` (abstract inputs) and its seconds."""
  import time

  from jaxspeed.training.step import batch_sharding
  from jaxspeed.training.trainer import build

  start = time.perf_counter()
  setup = build(config, devices=devices)
  tokens = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jax.numpy.int32,
                                sharding=batch_sharding(setup.mesh))
  with jax.set_mesh(setup.mesh):
    compiled = setup.train_step.lower(setup.abstract_state(),
                                      {"inputs": tokens, "targets": tokens}).compile()
  return compiled, time.perf_counter() - start


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  return float(analysis.get("flops", 0.0))


def measure(config: ml_collections.ConfigDict, layout: Layout, devices) -> Compiled:
  """Compiles ``layout`` of ``config`` on ``devices`` and reads its per-device figures."""
  compiled, seconds = compile_step(apply_layout(config, layout), devices)
  memory = compiled.memory_analysis()
  flops = _flops(compiled)
  if layout.microbatches > 1 and layout.shape["stage"] == 1:  # see the module docstring
    single, more = compile_step(apply_layout(config, dataclasses.replace(layout, microbatches=1)),
                                devices)
    flops, seconds = _flops(single), seconds + more
  return Compiled(memory.argument_size_in_bytes, memory.temp_size_in_bytes,
                  memory.output_size_in_bytes, memory.alias_size_in_bytes, flops,
                  tuple(collectives(compiled.as_text(), len(devices))), seconds)


class Cache:
  """Compiled figures by layout name, kept in a JSON file so a rerun compiles only what is new."""

  def __init__(self, path: str | None):
    self._path = path
    self._entries: dict[str, dict] = {}
    if path and os.path.exists(path):
      with open(path) as f:
        self._entries = json.load(f)

  def get(self, key: str) -> Compiled | None:
    entry = self._entries.get(key)
    return None if entry is None else Compiled.from_json(entry)

  def put(self, key: str, compiled: Compiled) -> None:
    self._entries[key] = compiled.to_json()
    if self._path:
      tmp = f"{self._path}.tmp"
      with open(tmp, "w") as f:
        json.dump(self._entries, f)
      os.replace(tmp, self._path)
