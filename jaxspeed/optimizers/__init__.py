"""Optimizers that own their data-parallel communication (the 1-bit family), and float32
master weights for low-precision parameters."""

from jaxspeed.optimizers.base import CommunicatingOptimizer
from jaxspeed.optimizers.master import (
    MasterWeightsState,
    apply_updates,
    round_params,
    with_master_weights,
)
from jaxspeed.optimizers.onebit_adam import COMPRESSED, WARMUP, OneBitAdamState, onebit_adam
from jaxspeed.optimizers.onebit_lamb import OneBitLambState, onebit_lamb
from jaxspeed.optimizers.zero_one_adam import (
    LOCAL,
    ONEBIT_GRADIENT,
    SYNC,
    VARIANCE,
    ZeroOneAdamState,
    zero_one_adam,
    zero_one_kinds,
)

__all__ = [
    "COMPRESSED",
    "LOCAL",
    "ONEBIT_GRADIENT",
    "SYNC",
    "VARIANCE",
    "WARMUP",
    "CommunicatingOptimizer",
    "MasterWeightsState",
    "OneBitAdamState",
    "OneBitLambState",
    "ZeroOneAdamState",
    "apply_updates",
    "onebit_adam",
    "onebit_lamb",
    "round_params",
    "with_master_weights",
    "zero_one_adam",
    "zero_one_kinds",
]
