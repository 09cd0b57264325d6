"""How many more parameters fit a per-device memory budget with the optimizer state on the host.

  python -m experiments.offload [--quick]

ZeRO-Offload (Ren et al. 2021) keeps the float32 master weights and the Adam
moments in host memory and runs the update there; the device keeps the
low-precision parameters the model reads, and the gradients. For each ZeRO
stage on 8 devices (``data=8``; stage 3 as ``fsdp=8``), each precision

* ``float32``: float32 parameters, no master copy;
* ``bfloat16``: ZeRO-Offload's setting, ``model.param_dtype=bfloat16`` with a
  float32 master in the optimizer state;

and ``zero.offload_optimizer`` ``none`` and ``host``, it builds the train state
of a GPT and counts the bytes one device holds: the state's leaves from their
shardings and memory kinds (``bytes_per_device``), plus one gradient copy in
the parameter dtype, split as ZeRO splits gradients (the step holds every
gradient before the update). The footprint grows linearly with the layer
count, so two depths give bytes(L) = a + b·L, and the deepest model that fits
``--budget_mib`` of device memory follows; it is then checked by building that
depth and the next one. Activations are left out: they do not depend on
where the optimizer state lives.

Per parameter, without splitting (ZeRO-0), that is 4 + 8 + 4 = 16 bytes
against 4 + 4 in float32 (a ceiling of 2x), and 2 + 4 + 8 + 2 = 16 against
2 + 2 in ZeRO-Offload's setting (a ceiling of 4x): ``max_params_ratio_*`` are
the parameter-count ratios of the deepest models. Only memory is counted:
nothing compiles or runs. XLA:CPU's ``memory_analysis`` cannot measure it,
since it counts arguments in pinned host memory as device memory (and reports
every ``host_*`` size as 0).
"""

from __future__ import annotations

import math

import jax
from absl import flags
from jax.sharding import NamedSharding

import jaxspeed
from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.training.state import bytes_per_device

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: smaller budget, ZeRO-0 and ZeRO-1 only "
                          "(the shallow models).")
BUDGET_MIB = flags.DEFINE_float("budget_mib", 16.0, "Per-device device-memory budget.")
LAYOUTS = {0: {"data": 8}, 1: {"data": 8}, 2: {"data": 8}, 3: {"fsdp": 8}}
PRECISIONS = ("float32", "bfloat16")


def footprint(stage: int, precision: str, offload: str, num_layers: int) -> dict[str, int]:
  """Bytes one device holds: ``{"device": ..., "host": ..., "params": ...}``, the train
  state plus one gradient copy."""
  config = gpt_tiny.get_config()
  config.fit_parallel = False
  config.parallel.update({"data": 1, "fsdp": 1, "tensor": 1, **LAYOUTS[stage]})
  config.zero.update(stage=stage, offload_optimizer=offload)
  config.model.update(num_layers=num_layers, param_dtype=precision, dtype=precision)
  setup = jaxspeed.build(config)
  state = setup.abstract_state()
  held = bytes_per_device(state)
  grads = jax.tree.map(lambda p, spec: math.prod(
      NamedSharding(setup.mesh, spec).shard_shape(p.shape)) * p.dtype.itemsize,
      state.params, setup.specs.grads)
  held["device"] += sum(jax.tree.leaves(grads))
  held["params"] = sum(x.size for x in jax.tree.leaves(state.params))
  return held


def deepest(stage: int, precision: str, offload: str, budget: float
            ) -> tuple[int, dict[str, int]]:
  """The most layers whose footprint fits ``budget`` bytes of device memory, and its bytes."""
  one, two = (footprint(stage, precision, offload, n)["device"] for n in (1, 2))
  per_layer, base = two - one, 2 * one - two
  layers = int((budget - base) // per_layer)
  held = footprint(stage, precision, offload, layers)
  # Checked, not only extrapolated: this depth fits and one more layer does not.
  assert held["device"] <= budget < footprint(stage, precision, offload, layers + 1)["device"]
  return layers, held


def main(argv):
  del argv
  common.setup_devices()
  budget = (4.0 if QUICK.value else BUDGET_MIB.value) * 2**20
  rows, summary = [], {"budget_mib": budget / 2**20}
  for stage in (0, 1) if QUICK.value else LAYOUTS:
    for precision in PRECISIONS:
      params = {}
      for offload in ("none", "host"):
        layers, held = deepest(stage, precision, offload, budget)
        params[offload] = held["params"]
        rows.append({"zero_stage": stage, "param_dtype": precision,
                     "offload_optimizer": offload, "max_layers": layers,
                     "max_params": held["params"], "device_mib": held["device"] / 2**20,
                     "host_mib": held["host"] / 2**20})
        print(rows[-1], flush=True)
      summary[f"zero{stage}_{precision}_params_ratio"] = params["host"] / params["none"]
  # The paper's setting: one GPU (ZeRO-0 keeps everything on each device), mixed precision.
  summary["max_params_ratio_optimizer_offload"] = summary["zero0_bfloat16_params_ratio"]
  summary["max_params_ratio_fp32"] = summary["zero0_float32_params_ratio"]
  header = ("Paper (ZeRO-Offload): 10x larger models on one GPU, the fp32 master weights and "
            "Adam moments (12 of 16 bytes per parameter) on the host. Here: the deepest GPT "
            "(d_model 128) whose per-device train state plus one gradient copy fits the "
            "budget, counted from the arrays' shardings and memory kinds, on 8 devices. "
            "Ceilings without splitting (ZeRO-0): 4x in ZeRO-Offload's precision setting "
            "(bfloat16 parameters and gradients on the device, 16 -> 4 bytes per parameter), "
            "2x in float32 (16 -> 8). The gradients stay on the device for the whole backward "
            "pass here; ZeRO-Offload streams them to the host bucket by bucket, which is where "
            "the rest of the paper's 10x comes from (with activation checkpointing).")
  common.write_results("offload", summary, rows,
                       {"budget_mib": budget / 2**20, "layouts": LAYOUTS, "quick": QUICK.value,
                        "devices": jax.device_count()}, header)


if __name__ == "__main__":
  common.run_app(main)
