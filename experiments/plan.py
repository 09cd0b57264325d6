"""Layout planner: rank the parallel layouts of a model on N devices without the devices.

  python -m experiments.plan --config=configs/gpt3_1p3b.py --devices=64 \
      --hardware=h100_8x_ib400
  python -m experiments.plan --quick      # tiny GPT, 8 devices, checked against measured steps

Every layout the config rules accept (``jaxspeed.planner.enumerate_layouts``:
mesh factorizations x ZeRO stage x remat x microbatches) is compiled ahead of
time on ``--devices`` virtual CPU devices from abstract inputs, and its
compiled program's memory, FLOPs and collectives feed the cost model
(``jaxspeed.planner.cost``, assumptions in its docstring) on a hardware
profile (``jaxspeed.planner.hardware``). Layouts that do not fit the device
memory are dropped; the rest are ranked by predicted step time.

Scale. With ``--extrapolate_depth`` each layout is compiled at two small
depths (p and 2p layers for p stages) and every figure is extended linearly
to the model's depth (each layer adds the same FLOPs, bytes and collectives),
so compile time does not grow with the layer count. Compiled figures are
cached by layout in ``<output_dir>/plan_cache_*.json``: a rerun compiles only
what is new.

Validation (``--validate``; with ``--quick``, three meshes compiled at full depth): the CPU host's
profile is calibrated by a micro-benchmark (``calibrate_cpu``), the
``--validate_layouts`` layouts (spread over the ranking) are each run, steps
interleaved, and the measured medians are compared with the predictions:
Spearman's rank correlation and the median relative error of the time. The
memory the planner reads is the compiled program's own figure; its arguments
(state and batch) are compared with the bytes of the arrays alive on one device
after a step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

import jaxspeed
from experiments import common
from jaxspeed.errors import FlagError
from jaxspeed.models import ModelConfig
from jaxspeed.planner import (
  PROFILES,
  Cache,
  NoLayoutFits,
  StepCosts,
  apply_layout,
  calibrate_cpu,
  enumerate_layouts,
  measure,
  predict,
  rank,
  step_costs,
)

CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt_tiny.py", "The model and run.")
DEVICES = flags.DEFINE_integer("devices", 8, "Devices to plan for (virtual CPU devices).")
HARDWARE = flags.DEFINE_string("hardware", "cpu_host", f"One of {sorted(PROFILES)}.")
OVERRIDES = flags.DEFINE_list("hardware_overrides", [],
                              "field=value pairs replacing the profile's, e.g. memory_bytes=4e10.")
ZERO = flags.DEFINE_list("zero_stages", ["1", "3"], "ZeRO stages to consider.")
REMAT = flags.DEFINE_list("remat", ["none", "full"], "Remat policies to consider.")
MICRO = flags.DEFINE_list("microbatches", ["1", "4"], "Microbatch counts to consider.")
MAX_TENSOR = flags.DEFINE_integer("max_tensor", 8, "Largest tensor-parallel degree.")
EXTRAPOLATE = flags.DEFINE_bool("extrapolate_depth", True,
                                "Compile at two small depths and extend to the model's.")
SEARCH = flags.DEFINE_enum(
    "search", "exhaustive", ["exhaustive", "first_fit"],
    "exhaustive: compile every layout; first_fit: per mesh, compile the options fastest first "
    "(ZeRO-1 before 3, no remat before full, fewer microbatches first) and stop at the first "
    "that fits.")
MAX_AXES = flags.DEFINE_list("max_axis_sizes", [],
                             "axis=size bounds besides --max_tensor, e.g. sequence=1,stage=4.")
TIME_BUDGET = flags.DEFINE_float("time_budget_s", 0.0,
                                 "Stop compiling new layouts after this many seconds (0: none); "
                                 "the cache keeps what was compiled for a rerun.")
VALIDATE = flags.DEFINE_bool("validate", False, "Run layouts and compare with predictions.")
VALIDATE_LAYOUTS = flags.DEFINE_integer("validate_layouts", 8, "Layouts run to validate.")
REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps per validated layout.")
QUICK = flags.DEFINE_bool("quick", False, "Tiny GPT on 8 devices, 3 layouts compiled, validated.")

QUICK_MESHES = ("data8", "data2.tensor4", "data2.stage2.tensor2")
# Published training runs to set the chosen layout's MFU against.
PUBLISHED = ("Megatron-LM (Narayanan et al. 2021, table 1): 1.7B GPT on 32 A100s, 44% of peak "
             "(137 TFLOP/s per GPU); MaxText's published GPT-3-class runs: 50-60% MFU on "
             "TPU v5p")


def _hardware():
  if HARDWARE.value not in PROFILES:
    raise FlagError("hardware", f"unknown profile {HARDWARE.value!r}; allowed: "
                    f"{', '.join(sorted(PROFILES))}")
  fields = {}
  for pair in OVERRIDES.value:
    name, _, value = pair.partition("=")
    known = {f.name for f in dataclasses.fields(PROFILES["cpu_host"])} - {"name", "peak_flops"}
    if name not in known or not value:
      raise FlagError("hardware_overrides", f"{pair!r}: expected field=value with field one "
                      f"of {', '.join(sorted(known))}")
    fields[name] = float(value)
  return PROFILES[HARDWARE.value].with_overrides(**fields)


def _ints(holder) -> list[int]:
  try:
    return [int(v) for v in holder.value]
  except ValueError as e:
    raise FlagError(holder.name, f"expected integers, got {holder.value}") from e


def _depths(layout, num_layers: int) -> tuple[int, ...]:
  """The depths a layout is compiled at: the model's, or p and 2p layers to extrapolate."""
  stages = layout.shape["stage"]
  if QUICK.value or not EXTRAPOLATE.value or num_layers <= 2 * stages:
    return (num_layers,)
  return (stages, 2 * stages)


def _costs(config, layout, devices, cache: Cache, devices_per_node: int) -> tuple[StepCosts, float]:
  """The layout's ``StepCosts`` at the config's depth, and the seconds spent compiling."""
  depths = _depths(layout, config.model.num_layers)
  found, seconds = [], 0.0
  for depth in depths:
    key = f"{layout.name} L{depth}"
    compiled = cache.get(key)
    if compiled is None:
      shallow = apply_layout(config, layout)
      shallow.model.num_layers = depth
      compiled = measure(shallow, layout, devices)
      cache.put(key, compiled)
      seconds += compiled.compile_seconds
    found.append(step_costs(layout, compiled, devices_per_node))
  if len(found) == 1:
    return found[0], seconds
  return StepCosts.extrapolate(found[0], depths[0], found[1], depths[1],
                               config.model.num_layers), seconds


def _speed_order(layout) -> tuple:
  """Per mesh, the options likely fastest first (``--search=first_fit``): ZeRO-1, no remat,
  and fewer microbatches, except in a pipeline, where more microbatches shrink the bubble."""
  pipelined = layout.shape["stage"] > 1
  # Shallow pipelines first: their programs (m + p − 1 unrolled iterations) compile slowest.
  return (layout.shape["stage"], layout.axes, layout.zero_stage, layout.remat != "none",
          -layout.microbatches if pipelined else layout.microbatches)


def _ranks(values) -> np.ndarray:
  order = np.argsort(values)
  ranks = np.empty(len(values))
  ranks[order] = np.arange(len(values))
  return ranks


def _validate(config, predictions: list, devices, repeats: int, cache: Cache
              ) -> tuple[dict, list[dict]]:
  """Runs each predicted layout (steps interleaved) and compares with its prediction."""
  runs = []
  for prediction in predictions:
    setup = jaxspeed.build(apply_layout(config, prediction.layout), devices=devices)
    with jax.set_mesh(setup.mesh):
      state = setup.init_state()
      batch = setup.to_device(setup.train_data.batch_at(0))
      state, _ = setup.train_step(state, batch, 0)  # compile outside the timings
      jax.block_until_ready(state)
      # The run's own arrays on device 0 (other runs' stay alive beside them).
      live = sum(s.data.nbytes for a in jax.tree.leaves((state, batch))
                 for s in a.addressable_shards if s.device == devices[0])
    runs.append({"setup": setup, "state": state, "batch": batch, "times": [], "live": live})
    del setup, state
  for step in range(1, repeats + 1):
    for run in runs:
      with jax.set_mesh(run["setup"].mesh):
        start = time.perf_counter()
        run["state"], metrics = run["setup"].train_step(run["state"], run["batch"], step)
        jax.block_until_ready((run["state"], metrics))
        run["times"].append(time.perf_counter() - start)
  rows = []
  for prediction, run in zip(predictions, runs, strict=True):
    measured = float(np.median(run["times"]))
    rows.append({"layout": prediction.layout.name, "predicted_s": prediction.step_s,
                 "measured_s": measured, "time_error": prediction.step_s / measured - 1,
                 "compiled_peak_mib": prediction.peak_bytes / 2**20,
                 "live_arrays_mib_device0": run["live"] / 2**20})
    compiled = cache.get(f"{prediction.layout.name} L{config.model.num_layers}")
    if compiled is not None:  # the state and batch the compiled step takes, against live
      rows[-1]["compiled_arguments_mib"] = compiled.argument_bytes / 2**20
  predicted = [r["predicted_s"] for r in rows]
  measured = [r["measured_s"] for r in rows]
  spearman = float(np.corrcoef(_ranks(predicted), _ranks(measured))[0, 1])
  return {"spearman_predicted_vs_measured": spearman,
          "median_abs_time_error": float(np.median([abs(r["time_error"]) for r in rows]))}, rows


def _plot(predictions, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(12, 0.4 * len(predictions) + 1.5))
  names = [p.layout.name for p in predictions][::-1]
  time_ax.barh(names, [p.step_s for p in predictions][::-1])
  time_ax.set_xlabel("predicted step time (s)")
  memory_ax.barh(names, [p.peak_bytes / 2**30 for p in predictions][::-1])
  memory_ax.set_xlabel("peak memory per device (GiB)")
  memory_ax.set_yticklabels([])
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  quick = QUICK.value
  num_devices = 8 if quick else DEVICES.value
  common.setup_devices(num_devices)
  config = common.config_value(CONFIG)
  hardware = _hardware()
  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise FlagError("devices", f"{num_devices} devices asked, {len(devices)} available")
  start = time.perf_counter()
  if quick or HARDWARE.value == "cpu_host":
    hardware = calibrate_cpu(devices)
  bounds = {"tensor": MAX_TENSOR.value}
  for pair in MAX_AXES.value:
    axis, _, size = pair.partition("=")
    if not size.isdigit():
      raise FlagError("max_axis_sizes", f"{pair!r}: expected axis=size")
    bounds[axis] = int(size)
  layouts, rejected = enumerate_layouts(
      config, num_devices, zero_stages=_ints(ZERO), remats=REMAT.value,
      microbatches=_ints(MICRO), max_sizes=bounds)
  enumerated = len(layouts) + len(rejected)
  if quick:  # three meshes, one option each
    layouts = [lay for lay in layouts if lay.remat == "none" and lay.microbatches == 1
               and lay.zero_stage == 1 and lay.name.split()[0] in QUICK_MESHES]
  os.makedirs(common.OUTPUT_DIR.value, exist_ok=True)
  fingerprint = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True,
                                          default=str).encode()).hexdigest()[:12]
  cache = Cache(os.path.join(common.OUTPUT_DIR.value,
                             f"plan_cache_{fingerprint}_{num_devices}.json"))
  model = ModelConfig.from_config(config.model)
  model_flops = model.flops_per_token(config.seq_len) * config.batch_size * config.seq_len
  predictions, compile_seconds, skipped = [], 0.0, 0
  fitted_meshes = set()
  for layout in sorted(layouts, key=_speed_order):
    mesh = layout.name.split()[0]
    over_budget = TIME_BUDGET.value and time.perf_counter() - start > TIME_BUDGET.value
    if (SEARCH.value == "first_fit" and mesh in fitted_meshes) or over_budget:
      skipped += 1
      continue
    costs, seconds = _costs(config, layout, devices, cache, hardware.devices_per_node)
    compile_seconds += seconds
    predictions.append(predict(layout, costs, hardware, config.model.dtype, model_flops))
    if predictions[-1].fits:
      fitted_meshes.add(mesh)
  plan_seconds = time.perf_counter() - start
  try:
    fitting = rank(predictions, hardware.memory_bytes)
  except NoLayoutFits as error:
    raise FlagError("devices", str(error)) from error
  top = fitting[:10]
  rows = [{"rank": i + 1, "layout": p.layout.name, "peak_gib": p.peak_bytes / 2**30,
           "comm_gb_intra_node": p.bytes_intra_node / 1e9,
           "comm_gb_inter_node": p.bytes_inter_node / 1e9, "compute_s": p.compute_s,
           "exposed_comm_s": p.exposed_comm_s, "predicted_step_s": p.step_s, "mfu": p.mfu}
          for i, p in enumerate(top)]
  _plot(top, os.path.join(common.OUTPUT_DIR.value, "plan.png"))
  best = top[0]
  summary = {
      "devices": num_devices, "hardware": hardware.name,
      "layouts_enumerated": enumerated, "layouts_rejected": len(rejected),
      "layouts_compiled": len(predictions), "layouts_fitting": len(fitting),
      "layouts_skipped": skipped, "search": SEARCH.value,
      f"plan_seconds_{num_devices}dev": plan_seconds, "compile_seconds": compile_seconds,
      "chosen_layout": best.layout.name, "chosen_predicted_step_s": best.step_s,
      "chosen_predicted_mfu": best.mfu, "published_comparison": PUBLISHED,
  }
  if VALIDATE.value or quick:
    spread = fitting[:: max(1, len(fitting) // VALIDATE_LAYOUTS.value)][:VALIDATE_LAYOUTS.value]
    checks, checked = _validate(config, spread, devices, 3 if quick else REPEATS.value, cache)
    summary.update({f"{k}_{num_devices}dev": v for k, v in checks.items()})
    rows += checked
  header = (f"{config.model.num_layers}-layer GPT, d_model {config.model.d_model}, batch "
            f"{config.batch_size} x {config.seq_len} on {num_devices} devices of "
            f"{hardware.name}; top layouts by predicted step time (cost model: "
            "jaxspeed.planner.cost), then the validated layouts if any (predicted against "
            "measured on this host). plan.png plots the top layouts.")
  common.write_results("plan", summary, rows, config.to_dict(), header)


if __name__ == "__main__":
  common.run_app(main)
