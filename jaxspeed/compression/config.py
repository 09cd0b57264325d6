"""``config.compression``: DeepSpeed's ``compression_training``, one group per technique.

``modules`` are comma-separated regexes searched in each weight's params path
(e.g. ``layer_0/attention/query``, ``layer_1/mlp/wi``, ``embed/table``). Each
technique switches on at its ``schedule_offset`` (a step).
"""

from __future__ import annotations

import dataclasses

from jaxspeed.errors import ConfigError
from jaxspeed.schema import Section, setting

QUANTIZATION_TYPES = ("symmetric", "asymmetric")
# Static ranges need calibration state carried through training; the trainer
# quantizes activations token-wise on the fly (ZeroQuant's choice).
RANGE_CALIBRATIONS = ("dynamic",)


@dataclasses.dataclass(frozen=True)
class WeightQuantizationConfig(Section):
  """Quantization-aware training of the weights; ``target_bits`` 1 is binary, 2 ternary."""

  KEY = "compression.weight_quantization"

  enabled: bool = setting(False)
  schedule_offset: int = setting(0, ge=0)
  quantize_groups: int = setting(1, ge=1)
  quantization_type: str = setting("symmetric", choices=QUANTIZATION_TYPES)
  target_bits: int = setting(8, ge=1, le=8)
  modules: str = setting("attention,mlp")


@dataclasses.dataclass(frozen=True)
class ActivationQuantizationConfig(Section):
  """Fake-quantized inputs of the matched matmuls; DeepSpeed's offset of 1000 steps."""

  KEY = "compression.activation_quantization"

  enabled: bool = setting(False)
  schedule_offset: int = setting(1000, ge=0)
  quantization_type: str = setting("symmetric", choices=QUANTIZATION_TYPES)
  range_calibration: str = setting("dynamic", choices=RANGE_CALIBRATIONS)
  bits: int = setting(8, ge=2, le=8)
  modules: str = setting("attention,mlp")


@dataclasses.dataclass(frozen=True)
class SparsePruningConfig(Section):
  """N:M semi-structured sparsity: in every group of m consecutive input weights of an
  output channel, the n largest in magnitude are kept (mask recomputed each step)."""

  KEY = "compression.sparse_pruning"

  enabled: bool = setting(False)
  schedule_offset: int = setting(0, ge=0)
  n: int = setting(2, ge=1)
  m: int = setting(4, ge=2)
  modules: str = setting("mlp")

  def check(self) -> None:
    if self.n >= self.m:
      raise ConfigError("compression.sparse_pruning.n", f"need 1 <= n < m, got n={self.n}, "
                        f"m={self.m}")


@dataclasses.dataclass(frozen=True)
class CompressionTrainingConfig(Section):
  """The three techniques; all off by default."""

  KEY = "compression"

  weight_quantization: WeightQuantizationConfig = setting(factory=WeightQuantizationConfig)
  activation_quantization: ActivationQuantizationConfig = setting(
      factory=ActivationQuantizationConfig)
  sparse_pruning: SparsePruningConfig = setting(factory=SparsePruningConfig)
