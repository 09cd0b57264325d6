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

__all__ = [
    "DATA_AXES",
    "MESH_AXES",
    "compute_rules",
    "data_parallel_size",
    "logical_to_spec",
    "make_mesh",
    "named",
    "resolve_mesh_shape",
    "use_cpu_devices",
    "zero_spec",
]
