"""What the devices are: their peak FLOP/s (for MFU) and a mesh layout that fits them.

Peak figures are dense (no 2:4 sparsity) matmul throughput per device, from the
vendors' data sheets. With ``model.dtype="float32"`` JAX's default matmul
precision runs on the bf16 MXU passes of a TPU and on TF32 tensor cores of an
A100/H100, so those are the float32 peaks used here, not the FP32 SIMT figures
(A100 19.5, H100 SXM 67 TFLOP/s).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax

from jaxspeed.errors import ConfigError
from jaxspeed.parallel.mesh import MESH_AXES, resolve_mesh_shape

# The whole host, shared by all virtual CPU devices of a process: the matmul
# roofline of the 2-core AVX-512 machine the CPU figures in the README come from.
HOST_CPU_PEAK = 1.4e11

# (lower-case substring of ``device_kind``, bf16 peak, float32 peak) per device,
# most specific first: "TPU v5 lite" is a v5e, "NVIDIA H100 80GB HBM3" an H100 SXM.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989e12, 495e12),
    ("h100 pcie", 756e12, 378e12),
    ("h100", 989e12, 495e12),
    ("a100", 312e12, 156e12),
    ("tpu v6 lite", 918e12, 918e12),
    ("tpu v5 lite", 197e12, 197e12),
    ("tpu v5e", 197e12, 197e12),
    ("tpu v5", 459e12, 459e12),  # v5p
    ("tpu v4", 275e12, 275e12),
)


def peak_flops(override: float, dtype: str, devices=None) -> tuple[float, str]:
  """The FLOP/s that MFU divides by, and where the figure came from.

  Args:
    override: ``config.peak_flops``; > 0 is used as is (all devices together),
      0 looks the devices up in ``DEVICE_PEAKS``.
    dtype: ``config.model.dtype`` ("bfloat16" picks the bf16 column).
    devices: all devices of the run (default ``jax.devices()``).

  Returns:
    (total peak FLOP/s, a short description for the run summary). An unknown
    accelerator gives NaN, so MFU reads NaN rather than a made-up number.
  """
  if override > 0:
    return float(override), "config.peak_flops"
  devices = jax.devices() if devices is None else devices
  kind = devices[0].device_kind
  if devices[0].platform == "cpu":
    hosts = len({d.process_index for d in devices})
    return HOST_CPU_PEAK * hosts, f"{hosts} x CPU host {HOST_CPU_PEAK:.3g}"
  for key, bf16, fp32 in DEVICE_PEAKS:
    if key in kind.lower():
      per_device = bf16 if dtype == "bfloat16" else fp32
      return per_device * len(devices), f"{len(devices)} x {kind} {per_device:.3g}"
  return math.nan, f"unknown device kind {kind!r}: set config.peak_flops"


def fit_layout(parallel: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """``parallel`` if it fits ``num_devices``, else the nearest layout that does.

  Axes other than ``data`` are dropped to 1 innermost first (tensor, sequence,
  expert, stage, fsdp) and ``data`` takes the remaining devices, so one device
  gets ``data=1`` and four get ``data=1 x fsdp=2 x tensor=2`` from the demo's
  ``data=2 x fsdp=2 x tensor=2``.

  Returns:
    A full axis -> size dict whose product is ``num_devices``.
  """
  try:
    return resolve_mesh_shape(parallel, num_devices)
  except ConfigError:
    pass
  shape = {axis: int(parallel.get(axis, 1)) for axis in MESH_AXES}
  shape["data"] = -1
  for axis in reversed(MESH_AXES[1:]):
    try:
      return resolve_mesh_shape(shape, num_devices)
    except ConfigError:
      shape[axis] = 1
  return resolve_mesh_shape(shape, num_devices)


def describe_layout(shape: Mapping[str, int], devices) -> str:
  """One line: the mesh and the devices it covers, e.g. ``data=2 tensor=2 (4 x cpu)``."""
  axes = " x ".join(f"{a}={s}" for a, s in shape.items() if s > 1) or "one device"
  return f"{axes} ({len(devices)} x {devices[0].device_kind})"


def fit_config_layout(config, devices) -> None:
  """With ``config.fit_parallel``, replaces ``config.parallel`` by ``fit_layout``.

  When that changes the layout, process 0 prints the mesh it chose in one line:
  the demo keeps its three-axis layout on 8 virtual CPU devices and still runs
  on one GPU. Without ``fit_parallel`` a layout must fit the devices as written.
  """
  if not config.fit_parallel:
    return
  asked = {a: int(config.parallel.get(a, 1)) for a in MESH_AXES}
  shape = fit_layout(asked, len(devices))
  config.parallel.update(shape)
  if jax.process_index() == 0 and any(asked[a] not in (s, -1) for a, s in shape.items()):
    wanted = " x ".join(f"{a}={s}" for a, s in asked.items() if s != 1)
    print(f"mesh: {describe_layout(shape, devices)}; config.fit_parallel chose it because "
          f"{wanted} does not fit", flush=True)
