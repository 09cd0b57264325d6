"""``config.optim``: the optimizer, its learning-rate schedule and the 1-bit optimizers' knobs."""

from __future__ import annotations

import dataclasses

from jaxspeed.errors import ConfigError
from jaxspeed.schema import Section, setting

ONEBIT_OPTIMIZERS = ("onebit_adam", "onebit_lamb", "zero_one_adam")
OPTIMIZERS = ("adamw", "adam", "lamb", "sgd", *ONEBIT_OPTIMIZERS)
# With ``zero.offload_optimizer=host``, the optimizers whose update runs on the host
# (``compute_on("device_host")``). The 1-bit family keeps its state in host memory between
# steps and updates on device: inside a host computation JAX types the operands as host
# memory but the arrays an update builds itself (the compression's) as device memory, and
# refuses to mix the two in one ``jnp.where``.
HOST_UPDATE_OPTIMIZERS = ("adamw", "adam", "lamb", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
LR_UNITS = ("steps", "tokens", "layer_tokens")


@dataclasses.dataclass(frozen=True)
class AdversarialConfig(Section):
  """ScaLA's adversarial embedding noise (``jaxspeed.training.adversarial``).

  Attributes:
    epsilon: radius of each example's L2 ball around its token embeddings; 0 disables.
    steps: projected gradient-ascent steps on the perturbation per update.
    step_size: L2 length of each ascent step.
  """

  KEY = "optim.adversarial"

  epsilon: float = setting(0.0, ge=0)
  steps: int = setting(1, ge=1)
  step_size: float = setting(1e-3, gt=0)


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
  """Optimizer and schedule; the 1-bit fields keep DeepSpeed's defaults.

  Attributes:
    grad_clip: global-norm clip; 0 disables.
    lr_unit: warm-up and decay lengths counted in steps, tokens or (random-LTD's)
      layer-tokens.
    decay: decay length; 0 means the whole run.
    min_lr_ratio: the schedule's final learning rate as a fraction of the peak.
    freeze_step: 1-bit Adam / LAMB warm-up updates before compression.
    bias_correction: 1-bit Adam only; DeepSpeed has none.
    max_coeff, min_coeff, coeff_beta: 1-bit LAMB trust-ratio bounds and EMA.
    factor_max, factor_min, factor_threshold: 1-bit LAMB compression-stage
      factor bounds and rate limit.
    var_freeze_step, var_update_scaler, local_step_scaler, local_step_clipper:
      0/1 Adam's policies (local_step_scaler 32678 is DeepSpeed's default,
      likely meant 32768).
    adversarial: ScaLA's adversarial embedding noise.
  """

  KEY = "optim"

  name: str = setting("adamw", choices=OPTIMIZERS)
  learning_rate: float = setting(1e-3, gt=0)
  b1: float = setting(0.9, ge=0, lt=1)
  b2: float = setting(0.95, ge=0, lt=1)
  eps: float = setting(1e-8, gt=0)
  weight_decay: float = setting(0.1, ge=0)
  momentum: float = setting(0.9, ge=0, lt=1)  # sgd only
  grad_clip: float = setting(1.0, ge=0)
  schedule: str = setting("cosine", choices=SCHEDULES)
  lr_unit: str = setting("steps", choices=LR_UNITS)
  warmup: int = setting(10, ge=0)
  decay: int = setting(0, ge=0)
  min_lr_ratio: float = setting(0.1, ge=0, le=1)
  freeze_step: int = setting(100000, ge=1)
  bias_correction: bool = setting(False)
  max_coeff: float = setting(10.0, gt=0)
  min_coeff: float = setting(0.01, gt=0)
  coeff_beta: float = setting(0.9, ge=0, lt=1)
  factor_max: float = setting(4.0, gt=0)
  factor_min: float = setting(0.5, gt=0)
  factor_threshold: float = setting(0.1, ge=0, lt=1)
  var_freeze_step: int = setting(100000, ge=1)
  var_update_scaler: int = setting(16, ge=1)
  local_step_scaler: int = setting(32678, ge=1)
  local_step_clipper: int = setting(16, ge=1)
  adversarial: AdversarialConfig = setting(factory=AdversarialConfig)

  def check(self) -> None:
    if self.min_coeff > self.max_coeff:
      raise ConfigError("optim.min_coeff", f"need min_coeff <= max_coeff, got {self.min_coeff} "
                        f"and {self.max_coeff}")
    if self.factor_min > self.factor_max:
      raise ConfigError("optim.factor_min", f"need factor_min <= factor_max, got "
                        f"{self.factor_min} and {self.factor_max}")

  @property
  def onebit(self) -> bool:
    """A 1-bit optimizer: compresses each worker's whole local update."""
    return self.name in ONEBIT_OPTIMIZERS
