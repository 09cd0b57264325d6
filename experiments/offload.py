"""ZeRO-Offload, ZeRO-Infinity's parameter offload and SuperOffload's speculation, measured.

  python -m experiments.offload [--quick]

Capacity. ZeRO-Offload (Ren et al. 2021) keeps the float32 master weights and
the Adam moments in host memory and runs the update there; the device keeps
the low-precision parameters the model reads, and the gradients. For each ZeRO
stage on 8 devices (``data=8``; stage 3 as ``fsdp=8``), each precision

* ``float32``: float32 parameters, no master copy;
* ``bfloat16``: ZeRO-Offload's setting, ``model.param_dtype=bfloat16`` with a
  float32 master in the optimizer state;

and each offload mode (``none``, ``optimizer``, and at ZeRO-3
``optimizer+params``: the blocks' parameters on the host too, ZeRO-Infinity),
it builds the train state of a GPT and counts the bytes one device holds: the
state's leaves from their shardings and memory kinds (``bytes_per_device``),
plus the gradients in the parameter dtype. Without offload the step holds
every gradient in device memory before the update (split as ZeRO splits
gradients). With the update on the host, gradients stream to the host block
by block as the backward pass makes them (``StateSpecs.stream_gradients``), so
the device holds one block's gradient and the embeddings' at a time. The
footprint grows linearly with the layer count, so two depths give
bytes(L) = a + b·L, and the deepest model that fits ``--budget_mib`` of device
memory follows; it is checked by building that depth and the next one. Every
mode checkpoints activations (``model.remat=full``), and their one
[B/N, S, d_model] block input per layer is counted: with the parameters on the
host too, they are what grows with depth. Not counted, the same at every
depth: the activations of the one block being recomputed, and under ZeRO-3
its gathered parameters.

Per block parameter, without splitting (ZeRO-0), that is 4 + 8 + 4 = 16 bytes
against 4 in float32 (4x), and 2 + 4 + 8 + 2 = 16 against 2 in ZeRO-Offload's
setting (8x): ``max_params_ratio_*`` are the parameter-count ratios of the
deepest models. The embeddings (whose gradient stays on the device), the
activation checkpoints and whole layer counts move them off these figures, in
either direction. That the blocks' gradients
leave device memory inside the backward pass is checked on the program
(``tests/test_offload.py``); XLA:CPU's ``memory_analysis`` cannot measure it,
since it counts arguments in pinned host memory as device memory (and reports
every ``host_*`` size as 0).

Equality (full run only; the tests cover each option in fewer steps): 10 steps
of each offload option against the same run without it, on data=2 x fsdp=2 x
tensor=2 (``EQUALITY``).

Host time (full run only): the optimizer update's share of an offloaded step on
this CPU and its rate, and, marked as projections, the per-step transfer and
host-update times of a 13B-parameter model (the paper's single-V100 model).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import jaxspeed
from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.parallel.pipeline import is_layer_name
from jaxspeed.parallel.rules import named
from jaxspeed.training.state import bytes_per_device, state_shardings

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: smaller budget, ZeRO-0 and ZeRO-1 only "
                          "(the shallow models).")
BUDGET_MIB = flags.DEFINE_float("budget_mib", 16.0, "Per-device device-memory budget.")
LAYOUTS = {0: {"data": 8}, 1: {"data": 8}, 2: {"data": 8}, 3: {"fsdp": 8}}
PRECISIONS = ("float32", "bfloat16")
# What lives on the host: ``zero`` settings per mode; parameter offload needs ZeRO-3.
OFFLOADS = {"none": {},
            "optimizer": {"offload_optimizer": "host"},
            "optimizer+params": {"offload_optimizer": "host", "offload_params": "host"}}


def footprint(stage: int, precision: str, offload: str, num_layers: int) -> dict[str, int]:
  """Bytes one device holds: ``{"device": ..., "host": ..., "params": ...}``, the train
  state plus the gradients the step holds there."""
  config = gpt_tiny.get_config()
  config.fit_parallel = False
  config.parallel.update({"data": 1, "fsdp": 1, "tensor": 1, **LAYOUTS[stage]})
  config.zero.update(stage=stage, **OFFLOADS[offload])
  config.model.update(num_layers=num_layers, param_dtype=precision, dtype=precision,
                      remat="full")
  setup = jaxspeed.build(config)
  state = setup.abstract_state()
  held = bytes_per_device(state)
  # Activation checkpoints: each block's input [B / N, S, d_model] in the compute dtype.
  rows = config.batch_size // setup.mesh.size
  held["device"] += num_layers * rows * config.seq_len * config.model.d_model * (
      jnp.dtype(precision).itemsize)
  specs = setup.specs
  # Streamed gradients keep the parameters' slices (the host view's); the others ZeRO's.
  grad_shardings = (state_shardings(setup.mesh, specs).params if specs.stream_gradients
                    else named(setup.mesh, specs.grads))
  grads = {name: bytes_per_device(jax.tree.map(
               lambda p, sharding: jax.ShapeDtypeStruct(p.shape, p.dtype,
                                                        sharding=sharding.with_memory_kind(
                                                            "device")), tree, shardings))["device"]
           for (name, tree), shardings in zip(state.params.items(), grad_shardings.values(),
                                              strict=True)}
  if specs.stream_gradients:
    # Each block's gradient leaves device memory when the backward pass finishes the
    # block: at most one block's gradient is there at a time, with the embeddings' and
    # final norm's (made at the start and the end of the backward pass). All of it
    # reaches the host.
    blocks = [size for name, size in grads.items() if is_layer_name(name)]
    held["device"] += sum(grads.values()) - sum(blocks) + max(blocks)
    # The host also holds the view of the parameters the gradients are taken against.
    held["host"] += sum(grads.values()) + bytes_per_device(state.params)["device"]
  else:
    held["device"] += sum(grads.values())
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


# name: (the reference run's settings, what the offloaded run changes); data=2 x fsdp=2 x
# tensor=2, 10 steps each.
EQUALITY = {
    "optimizer, AdamW, ZeRO-1": ({"zero.stage": 1}, {"zero.offload_optimizer": "host"}),
    "optimizer, 1-bit Adam, ZeRO-1": ({"zero.stage": 1, "optim.name": "onebit_adam",
                                       "optim.freeze_step": 4},
                                      {"zero.offload_optimizer": "host"}),
    "optimizer, bfloat16 + float32 master, ZeRO-3": (
        {"zero.stage": 3, "model.param_dtype": "bfloat16", "model.dtype": "bfloat16"},
        {"zero.offload_optimizer": "host"}),
    "optimizer + parameters, ZeRO-3": ({"zero.stage": 3},
                                       {"zero.offload_optimizer": "host",
                                        "zero.offload_params": "host"}),
    "activations (remat)": ({"zero.stage": 3, "model.remat": "save_matmul_outputs"},
                            {"model.remat": "offload"}),
    "speculation, grad_clip 0.5": ({"zero.stage": 1, "zero.offload_optimizer": "host",
                                    "optim.grad_clip": 0.5},
                                   {"zero.offload_speculation": True}),
}
EQUALITY_STEPS = 10


def _losses(overrides: dict) -> list[float]:
  config = gpt_tiny.get_config()
  config.fit_parallel = False
  config.parallel.update(data=2, fsdp=2, tensor=2)
  config.model.num_layers = 2
  config.update_from_flattened_dict(overrides)
  setup = jaxspeed.build(config)
  losses = []
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    for _ in range(EQUALITY_STEPS):
      state, metrics = setup.train_step(state, setup.to_device(setup.train_data.next_batch()))
      losses.append(float(metrics["loss"]))
  return losses


def equality_rows() -> list[dict]:
  """Each offload option against the same run without it: the largest relative loss gap."""
  rows = []
  for name, (base, change) in EQUALITY.items():
    reference, offloaded = _losses(base), _losses({**base, **change})
    gap = max(abs(a - b) / abs(b) for a, b in zip(offloaded, reference, strict=True))
    rows.append({"equality": name, "steps": EQUALITY_STEPS, "max_rel_diff": gap})
    print(rows[-1], flush=True)
  return rows


# The projection's hardware, as stated by the papers' settings: a PCIe 4.0 x16 link (ZeRO-
# Offload's GPU servers) and GH200's NVLink-C2C (SuperOffload), per direction.
LINK_BYTES_PER_S = {"pcie4_x16": 32e9, "nvlink_c2c": 450e9}


def host_share() -> dict[str, float]:
  """Measured here: the host update's share of an offloaded step, and its rate.

  Then, as a projection (not measured), per step of a 13B-parameter model with
  the paper's transfer volume (bfloat16 gradients down, bfloat16 parameters up:
  4 bytes per parameter) over each link of ``LINK_BYTES_PER_S``.
  """
  config = gpt_tiny.get_config()
  config.fit_parallel = False
  config.parallel.update(data=1, fsdp=1, tensor=1)
  config.model.update(num_layers=4, param_dtype="bfloat16", dtype="bfloat16")
  config.zero.offload_optimizer = "host"
  setup = jaxspeed.build(config, devices=jax.devices()[:1])
  state = setup.init_state()
  with jax.set_mesh(setup.mesh):
    batch = setup.to_device(setup.train_data.next_batch())
    # The update alone, as the step runs it (on this CPU, host and device are one memory).
    update = jax.jit(lambda g, o: setup.optimizer.update(g, o, None))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 1e-3, jnp.float32), state.params)
    on_device = lambda tree: jax.tree.map(
        lambda x: jax.device_put(x, x.sharding.with_memory_kind("device")), tree)
    jax.block_until_ready(update(grads, on_device(state.opt_state)))
    step_s, update_s = [], []
    for _ in range(6):
      start = time.perf_counter()
      state, _ = setup.train_step(state, batch)
      jax.block_until_ready(state)
      step_s.append(time.perf_counter() - start)
      opt_state = on_device(state.opt_state)
      start = time.perf_counter()
      jax.block_until_ready(update(grads, opt_state))
      update_s.append(time.perf_counter() - start)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  step, seconds = float(np.median(step_s[1:])), float(np.median(update_s[1:]))
  out = {"host_update_share": seconds / step, "host_update_params_per_s": params / seconds,
         "projection_13b_host_update_s_this_cpu": 13e9 * seconds / params}
  for link, rate in LINK_BYTES_PER_S.items():
    out[f"projection_13b_transfer_s_{link}"] = 13e9 * 4 / rate
  return out


def main(argv):
  del argv
  common.setup_devices()
  budget = (4.0 if QUICK.value else BUDGET_MIB.value) * 2**20
  rows, summary = [], {"budget_mib": budget / 2**20}
  for stage in (0, 1) if QUICK.value else LAYOUTS:
    for precision in PRECISIONS:
      params = {}
      for offload in OFFLOADS if stage == 3 else ("none", "optimizer"):
        layers, held = deepest(stage, precision, offload, budget)
        params[offload] = held["params"]
        rows.append({"zero_stage": stage, "param_dtype": precision, "offload": offload,
                     "max_layers": layers, "max_params": held["params"],
                     "device_mib": held["device"] / 2**20, "host_mib": held["host"] / 2**20})
        print(rows[-1], flush=True)
      summary[f"zero{stage}_{precision}_params_ratio"] = params["optimizer"] / params["none"]
      if stage == 3:
        summary[f"zero3_{precision}_full_offload_params_ratio"] = (
            params["optimizer+params"] / params["none"])
  # The paper's setting: one GPU (ZeRO-0 keeps everything on each device), mixed precision.
  summary["max_params_ratio_optimizer_offload"] = summary["zero0_bfloat16_params_ratio"]
  summary["max_params_ratio_fp32"] = summary["zero0_float32_params_ratio"]
  if not QUICK.value:
    summary["max_params_ratio_full_offload"] = summary["zero3_bfloat16_full_offload_params_ratio"]
    equality = equality_rows()
    rows += equality
    summary["equality_max_rel_diff"] = max(r["max_rel_diff"] for r in equality)
    summary.update(host_share())
  header = ("Paper (ZeRO-Offload): 10x larger models on one GPU, the fp32 master weights and "
            "Adam moments (12 of 16 bytes per parameter) on the host. Here: the deepest GPT "
            "(d_model 128) whose per-device train state, gradients and activation "
            "checkpoints (full remat) fit the budget, counted from the arrays' shardings "
            "and memory kinds, on 8 devices. "
            "With the update on the host, gradients stream to the host block by block as the "
            "backward pass makes them, so the device holds one block's gradient (and the "
            "embeddings') at a time. Per block parameter without splitting (ZeRO-0): "
            "16 -> 2 bytes in ZeRO-Offload's precision setting (bfloat16 parameters on the "
            "device; 8x), 16 -> 4 in float32 (4x); the embeddings (whose gradient stays on "
            "the device), the activation checkpoints and whole layer counts move the "
            "measured ratios off these figures, in either direction. "
            "optimizer+params (ZeRO-3) also keeps the blocks' parameters on the host "
            "(ZeRO-Infinity). Equality rows: each offload option against the same run "
            "without it, 10 steps. projection_* keys are arithmetic, not measurements: "
            "4 bytes per parameter moved per step over the stated link, and this CPU's "
            "measured update rate scaled to 13B parameters.")
  common.write_results("offload", summary, rows,
                       {"budget_mib": budget / 2**20, "layouts": LAYOUTS, "quick": QUICK.value,
                        "devices": jax.device_count()}, header)


if __name__ == "__main__":
  common.run_app(main)
