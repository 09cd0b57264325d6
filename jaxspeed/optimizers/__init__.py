"""Optimizers that own their data-parallel communication: the 1-bit family."""

from jaxspeed.optimizers.base import CommunicatingOptimizer
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
    "OneBitAdamState",
    "OneBitLambState",
    "ZeroOneAdamState",
    "onebit_adam",
    "onebit_lamb",
    "zero_one_adam",
    "zero_one_kinds",
]
