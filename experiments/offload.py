"""How many more layers fit a per-device memory budget with the optimizer state on the host.

  python -m experiments.offload [--quick]

ZeRO-Offload (Ren et al. 2021) keeps the optimizer state in host memory. For
each ZeRO stage on 8 devices (``data=8``; stage 3 as ``fsdp=8``) it builds the
train state of a GPT with ``zero.offload_optimizer`` ``none`` and ``host``
and counts, from every leaf's sharding and memory kind, the bytes one device
holds in device and in host memory (``bytes_per_device``). The state grows
linearly with the layer count, so two depths give bytes(L) = a + b·L, and the
deepest model whose state fits ``--budget_mib`` of device memory follows; it
is then checked by building that depth and the next one.

Only the state at rest is counted: nothing compiles or runs. XLA:CPU's
``memory_analysis`` cannot measure the rest, since it counts arguments in
pinned host memory as device memory (and reports every ``host_*`` size as 0).
"""

from __future__ import annotations

import jax
from absl import flags

import jaxspeed
from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.training.state import bytes_per_device

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: smaller budget, ZeRO-0 and ZeRO-1 only "
                          "(the shallow models).")
BUDGET_MIB = flags.DEFINE_float("budget_mib", 16.0, "Per-device device-memory budget.")
LAYOUTS = {0: {"data": 8}, 1: {"data": 8}, 2: {"data": 8}, 3: {"fsdp": 8}}


def state_bytes(stage: int, offload: str, num_layers: int) -> dict[str, int]:
  """Bytes of the train state one device holds: ``{"device": ..., "host": ...}``."""
  config = gpt_tiny.get_config()
  config.fit_parallel = False
  config.parallel.update({"data": 1, "fsdp": 1, "tensor": 1, **LAYOUTS[stage]})
  config.zero.update(stage=stage, offload_optimizer=offload)
  config.model.num_layers = num_layers
  return bytes_per_device(jaxspeed.build(config).abstract_state())


def deepest(stage: int, offload: str, budget: float) -> tuple[int, dict[str, int]]:
  """The most layers whose state fits ``budget`` bytes of device memory, and its bytes."""
  one, two = (state_bytes(stage, offload, n)["device"] for n in (1, 2))
  per_layer, base = two - one, 2 * one - two
  layers = int((budget - base) // per_layer)
  held = state_bytes(stage, offload, layers)
  # Checked, not only extrapolated: this depth fits and one more layer does not.
  assert held["device"] <= budget < state_bytes(stage, offload, layers + 1)["device"]
  return layers, held


def main(argv):
  del argv
  common.setup_devices()
  budget = (4.0 if QUICK.value else BUDGET_MIB.value) * 2**20
  rows, summary = [], {"budget_mib": budget / 2**20}
  for stage in (0, 1) if QUICK.value else LAYOUTS:
    layers = {}
    for offload in ("none", "host"):
      layers[offload], held = deepest(stage, offload, budget)
      rows.append({"zero_stage": stage, "offload_optimizer": offload,
                   "max_layers": layers[offload],
                   "device_mib": held["device"] / 2**20, "host_mib": held["host"] / 2**20})
      print(rows[-1], flush=True)
    summary[f"zero{stage}_layers_ratio"] = layers["host"] / layers["none"]
  header = ("Paper (ZeRO-Offload): the fp32 master parameters and Adam state (about 12 of 16 "
            "bytes per parameter) move to the host. Here: parameters are float32 in device "
            "memory and only the AdamW state moves, so device bytes per parameter drop from "
            "12 to 4 when nothing else is split (ZeRO-0) or all is (ZeRO-3), and from "
            "4 + 8/8 to 4 at ZeRO-1/2 on 8 devices. Deepest GPT (d_model 128) whose train "
            "state at rest fits the per-device budget, counted from the arrays' memory kinds.")
  common.write_results("offload", summary, rows,
                       {"budget_mib": budget / 2**20, "layouts": LAYOUTS, "quick": QUICK.value,
                        "devices": jax.device_count()}, header)


if __name__ == "__main__":
  common.run_app(main)
