"""``config.parallel``, ``config.zero`` and ``config.sequence_parallel``: how the run is split."""

from __future__ import annotations

import dataclasses

from jaxspeed.errors import ConfigError
from jaxspeed.parallel.pipeline import SCHEDULES
from jaxspeed.schema import Section, setting

ZERO_STAGES = (0, 1, 2, 3)
# ``zero.offload_optimizer`` -> the memory kind the optimizer state lives in.
OFFLOAD_MEMORY_KINDS = {"none": "device", "host": "pinned_host"}


@dataclasses.dataclass(frozen=True)
class ParallelConfig(Section):
  """Mesh axis sizes; one may be -1 (the devices left). ``resolve_mesh_shape`` checks them."""

  KEY = "parallel"

  data: int = setting(-1)
  fsdp: int = setting(1)
  stage: int = setting(1)
  expert: int = setting(1)
  sequence: int = setting(1)
  tensor: int = setting(1)


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Section):
  """How a pipeline (``parallel.stage`` > 1) schedules its ``microbatches``.

  ``schedule``: ``gpipe`` (Huang et al. 2019: all forward passes, then all
  backward passes) or ``1f1b`` (PipeDream-flush, DeepSpeed's pipeline engine:
  each microbatch's backward pass as soon as its loss is known, so a stage
  holds min(2p − 1, m) microbatches' inputs instead of m; see
  ``jaxspeed.parallel.one_f_one_b``) or ``interleaved`` (Megatron's circular
  schedule, Narayanan et al. 2021: each stage holds ``virtual_stages`` chunks
  of layers assigned round-robin, bubble (p − 1) / (v·m + p − 1); see
  ``jaxspeed.parallel.pipeline.circular``). ``virtual_stages`` is read by
  ``interleaved`` only.
  """

  KEY = "pipeline"

  schedule: str = setting("gpipe", choices=SCHEDULES)
  virtual_stages: int = setting(2, ge=2)


@dataclasses.dataclass(frozen=True)
class ZeroConfig(Section):
  """ZeRO (Rajbhandari et al. 2020): 1 shards optimizer state, 2 also gradients, 3 also
  parameters, over the data-parallel axes.

  ``offload_optimizer="host"`` is ZeRO-Offload (Ren et al. 2021): each device's slice of
  the optimizer state lives in pinned host memory and the optimizer update runs on the
  host. ``offload_params="host"`` (stage 3 only) is ZeRO-Infinity's parameter offload
  (Rajbhandari et al. 2021): each device's slice of the blocks' parameters lives in pinned
  host memory and each block copies its own to the device where it runs.
  ``quantized_weights`` is ZeRO++'s qwZ (Wang et al. 2023): the ZeRO-3 parameter
  all-gather moves int8 codes with block scales. ``hpz_partition_size`` is ZeRO++'s hpZ
  (DeepSpeed's ``zero_hpz_partition_size``): the devices of a node, which must be the
  ``fsdp`` axis (``data`` runs across nodes); the blocks then gather their parameters
  from a secondary copy split over those devices only. ``quantized_gradients`` is ZeRO++'s
  qgZ: the gradient reduce-scatter that crosses nodes moves int4 codes.
  ``offload_speculation`` is SuperOffload's
  speculation-then-validation (Lian et al. 2025): the host update starts before the
  gradient norm is known and is redone when clipping applies. ``reduce_scatter`` reduces
  ZeRO-2/3's gradients with an explicit reduce-scatter over the data axes (each device
  sends (N-1)/N of a gradient) instead of the all-reduce and slice XLA:CPU compiles.
  """

  KEY = "zero"

  stage: int = setting(0, choices=ZERO_STAGES)
  offload_optimizer: str = setting("none", choices=OFFLOAD_MEMORY_KINDS)
  offload_params: str = setting("none", choices=OFFLOAD_MEMORY_KINDS)
  offload_speculation: bool = setting(False)
  quantized_weights: bool = setting(False)
  hpz_partition_size: int = setting(1, ge=1)
  quantized_gradients: bool = setting(False)
  reduce_scatter: bool = setting(False)

  def check(self) -> None:
    if self.offload_params != "none" and self.stage != 3:
      raise ConfigError("zero.offload_params", "needs zero.stage=3 (the parameters split "
                        f"over the data-parallel devices), got stage {self.stage}; allowed "
                        "at this stage: none")
    if self.quantized_weights and self.stage != 3:
      raise ConfigError("zero.quantized_weights", "quantizes ZeRO-3's parameter all-gather: "
                        f"needs zero.stage=3, got stage {self.stage}; allowed here: False")
    if self.hpz_partition_size > 1 and self.stage != 3:
      raise ConfigError("zero.hpz_partition_size", "splits ZeRO-3's parameters a second "
                        f"time: needs zero.stage=3, got stage {self.stage}; allowed here: 1")
    if self.quantized_gradients and self.stage != 3:
      raise ConfigError("zero.quantized_gradients", "quantizes ZeRO-3's gradient "
                        f"reduce-scatter: needs zero.stage=3, got stage {self.stage}; allowed "
                        "here: False")
    if self.reduce_scatter and self.stage < 2:
      raise ConfigError("zero.reduce_scatter", "reduces gradients onto ZeRO's gradient "
                        f"slices: needs zero.stage >= 2, got stage {self.stage}; allowed "
                        "here: False")
    if self.quantized_weights and self.offload_params != "none":
      raise ConfigError("zero.quantized_weights", "does not run with zero.offload_params "
                        "yet (the parameters would be quantized in host memory); allowed "
                        "with it: False")


@dataclasses.dataclass(frozen=True)
class SequenceParallelConfig(Section):
  """DeepSpeed-Ulysses needs seq_len % parallel.sequence == 0; ``pad`` right-pads causal-LM
  batches to a multiple instead (padded targets do not count)."""

  KEY = "sequence_parallel"

  pad: bool = setting(False)
