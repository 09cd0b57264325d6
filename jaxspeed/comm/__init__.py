"""Communication: the 1-bit compressed all-reduce and per-worker reductions."""

from jaxspeed.comm.onebit_allreduce import (
    ErrorFeedback,
    compressed_allreduce,
    packed_bytes_per_worker,
    padded_size,
    zero_error_feedback,
)
from jaxspeed.comm.workers import SIMULATED_AXIS, WorkerGroup

__all__ = [
    "SIMULATED_AXIS",
    "ErrorFeedback",
    "WorkerGroup",
    "compressed_allreduce",
    "packed_bytes_per_worker",
    "padded_size",
    "zero_error_feedback",
]
