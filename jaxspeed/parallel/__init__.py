"""The named mesh and the logical-axis sharding rules."""

from jaxspeed.parallel.mesh import (
    DATA_AXES,
    MESH_AXES,
    data_parallel_size,
    make_mesh,
    resolve_mesh_shape,
    use_cpu_devices,
)
from jaxspeed.parallel.rules import compute_rules, logical_to_spec, named, zero_spec
from jaxspeed.parallel.ulysses import (
    SEQUENCE_AXIS,
    pad_to_multiple,
    sequence_parallel_size,
    ulysses_attention,
)

__all__ = [
    "DATA_AXES",
    "MESH_AXES",
    "SEQUENCE_AXIS",
    "compute_rules",
    "data_parallel_size",
    "logical_to_spec",
    "make_mesh",
    "named",
    "pad_to_multiple",
    "resolve_mesh_shape",
    "sequence_parallel_size",
    "ulysses_attention",
    "use_cpu_devices",
    "zero_spec",
]
