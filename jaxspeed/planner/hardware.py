"""Hardware profiles: what the cost model needs to know of a cluster.

Peak FLOP/s come from ``jaxspeed.parallel.devices.DEVICE_PEAKS`` (vendors'
data sheets, dense). Link bandwidths are per device and per direction, from
the vendors' figures: NVLink 4 (H100 SXM) 450 GB/s, NVLink 3 (A100) 300 GB/s,
InfiniBand NDR 400 Gb/s = 50 GB/s and HDR 200 Gb/s = 25 GB/s per GPU with one
NIC per GPU; TPU v5e 1,600 Gb/s and v5p 4,800 Gb/s of ICI per chip, whole
slices as one "node", and 25 GB/s of data-center network per chip between
slices (an assumption: it depends on the deployment). A profile can be
overridden field by field (``with_overrides``), and the CPU host's is
calibrated by a micro-benchmark (``calibrate_cpu``).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeed.parallel.devices import DEVICE_PEAKS, HOST_CPU_PEAK

GIB = 2**30


def _peaks(kind: str) -> tuple[float, float]:
  """(bfloat16, float32) peak FLOP/s of a device kind in ``DEVICE_PEAKS``."""
  return next((bf16, fp32) for key, bf16, fp32 in DEVICE_PEAKS if key == kind)


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator kind and its interconnect.

  Attributes:
    peak_flops: {"bfloat16": FLOP/s, "float32": FLOP/s} of one device.
    memory_bytes: device memory a step may use.
    devices_per_node: devices joined by the fast tier (NVLink, ICI).
    intra_node_bandwidth, inter_node_bandwidth: bytes/s one device sends per
      direction within a node and across nodes.
    achievable_flops_fraction: the share of peak a well-tuned step reaches
      (MFU-like; 0.5 by default, about what large dense runs report).
    collective_latency: seconds each collective costs on top of its bytes.
  """

  name: str
  peak_flops: dict[str, float]
  memory_bytes: float
  devices_per_node: int
  intra_node_bandwidth: float
  inter_node_bandwidth: float
  achievable_flops_fraction: float = 0.5
  collective_latency: float = 10e-6

  def with_overrides(self, **fields) -> Hardware:
    return dataclasses.replace(self, **fields)


def _gpu(name: str, kind: str, memory_gib: float, nvlink: float, network: float) -> Hardware:
  bf16, fp32 = _peaks(kind)
  return Hardware(name, {"bfloat16": bf16, "float32": fp32}, memory_gib * GIB, 8, nvlink, network)


def _tpu(name: str, kind: str, memory_gib: float, ici: float, chips: int) -> Hardware:
  bf16, fp32 = _peaks(kind)
  return Hardware(name, {"bfloat16": bf16, "float32": fp32}, memory_gib * GIB, chips, ici, 25e9)


PROFILES: dict[str, Hardware] = {
    "h100_8x_ib400": _gpu("h100_8x_ib400", "h100", 80, 450e9, 50e9),
    "a100_8x_ib200": _gpu("a100_8x_ib200", "a100", 80, 300e9, 25e9),
    "tpu_v5e_256": _tpu("tpu_v5e_256", "tpu v5e", 16, 1600e9 / 8, 256),
    "tpu_v5p_4096": _tpu("tpu_v5p_4096", "tpu v5", 95, 4800e9 / 8, 4096),
    # Virtual CPU devices sharing one host: calibrate before use (``calibrate_cpu``).
    "cpu_host": Hardware("cpu_host", {"bfloat16": HOST_CPU_PEAK, "float32": HOST_CPU_PEAK},
                         24 * GIB, 1 << 30, 5e9, 5e9, 1.0, 50e-6),
}


def _median_seconds(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def calibrate_cpu(devices, matmul_size: int = 512, message_bytes: int = 1 << 22) -> Hardware:
  """The ``cpu_host`` profile measured on ``devices`` (virtual CPU devices of one host).

  FLOP/s: a float32 [n, n] @ [n, n] matmul on every device at once (they share
  the host's cores, so this is each device's share), its achievable fraction 1.
  Bandwidth: an all-gather of ``message_bytes`` per device across all devices,
  bytes each device receives over the time. Latency: the same with 4 bytes.
  """
  mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
  split = jax.sharding.PartitionSpec("d")
  local = lambda fn, out: jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=split, out_specs=out))
  n = matmul_size
  a = jax.device_put(jnp.ones((len(devices) * n, n), jnp.float32),
                     jax.sharding.NamedSharding(mesh, split))
  flops = 2 * n**3 / _median_seconds(local(lambda x: x @ x, split), a)
  gather = local(lambda x: jax.lax.all_gather(x, "d", tiled=True)[:1], split)
  words = message_bytes // 4
  big, small = (jax.device_put(jnp.ones((len(devices) * k,), jnp.float32),
                               jax.sharding.NamedSharding(mesh, split)) for k in (words, 1))
  latency = _median_seconds(gather, small)
  bandwidth = (len(devices) - 1) * message_bytes / max(_median_seconds(gather, big) - latency,
                                                      1e-9)
  profile = PROFILES["cpu_host"]
  return profile.with_overrides(peak_flops={"bfloat16": flops, "float32": flops},
                                intra_node_bandwidth=bandwidth, inter_node_bandwidth=bandwidth,
                                collective_latency=latency)
