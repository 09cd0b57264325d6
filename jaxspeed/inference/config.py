"""``config.inference``: generation (``experiments.generate``), DeepSpeed Inference's names."""

from __future__ import annotations

import dataclasses

from jaxspeed.errors import ConfigError
from jaxspeed.inference.kv_policies import KvPolicyConfig
from jaxspeed.inference.sampling import SamplingConfig
from jaxspeed.schema import Section, setting


@dataclasses.dataclass(frozen=True)
class TensorParallelConfig(Section):
  """Devices the weights are split over for generation."""

  KEY = "inference.tensor_parallel"

  tp_size: int = setting(1, ge=1)


@dataclasses.dataclass(frozen=True)
class InferenceConfig(SamplingConfig):
  """The sampling fields plus:

  Attributes:
    max_out_tokens: KV-cache slots per sequence; 0 means model.max_seq_len.
    stop_tokens: comma-separated token ids.
  """

  KEY = "inference"

  max_out_tokens: int = setting(0, ge=0)
  max_new_tokens: int = setting(64, ge=1)
  stop_tokens: str = setting("")
  seed: int = setting(0)
  tensor_parallel: TensorParallelConfig = setting(factory=TensorParallelConfig)
  kv_compression: KvPolicyConfig = setting(factory=KvPolicyConfig)

  def check(self) -> None:
    try:
      _ = self.stop_token_ids
    except ValueError as e:
      raise ConfigError("inference.stop_tokens", f"comma-separated token ids, got "
                        f"{self.stop_tokens!r}") from e

  @property
  def stop_token_ids(self) -> tuple[int, ...]:
    return tuple(int(t) for t in str(self.stop_tokens).split(",") if t.strip())

  @property
  def sampling(self) -> SamplingConfig:
    return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
