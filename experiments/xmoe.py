"""X-MoE's dispatch on a DeepSeek-style MoE: all-to-all bytes, exactness and step time.

  python -m experiments.xmoe [--quick]

Claim (X-MoE, Yuan et al. SC'25): padding-free training and redundancy-bypassing
dispatch cut the all-to-all volume of fine-grained, high-k MoEs without
changing the model. Here: the demo GPT with 64 experts of d_ff / 8, top-8 (the
same compute per token as one d_ff expert), auxiliary-loss-free bias balancing,
dropless, on ``--cpu_devices`` = 8 devices with ep = 8 (8 experts per device);
four dispatches (``jaxspeed.moe.dropless``):

* ``exact``: room for every assignment, R = T · min(k, E/ep) rows per destination;
* ``padding_free``: ⌈slack · T · k / ep⌉ rows, falling back to ``exact`` when any
  device's rows overflow it (a ``lax.cond``);
* ``dedup``: one row per (token, destination shard), T rows, plus each row's
  min(k, E/ep) expert ids and gates;
* ``padding_free_dedup``: both.

Bytes are read from the compiled train step (``jaxspeed.comm.hlo``, ring cost
model: an all-to-all over P devices sends (P − 1)/P of its result), along each
path of the fallback's conditional (``path_collectives``): ``all_to_all_bytes``
when the tight buffers fit, ``all_to_all_bytes_fallback`` when they do not
(``..._run`` weighs the two by how many MoE layer-steps fell back). Per
MoE layer and device, with rows r per destination and 4-byte elements,

  plain:  (ep − 1) · r · (4 · d + 1) · 4    (rows 4x: dispatch and combine, forward
                                            and backward; int32 ids once)
  dedup:  (ep − 1) · r · (4 · d + 3 · m) · 4  (ids once, gates twice)

Each variant trains ``--steps`` steps from the same initialization; its losses
are compared with one device's (``loss_equal_rel_diff``, the largest relative
difference of the padding-free run) and its fallbacks counted. Step time is the
median of the steps after the first two, on a CPU host whose "network" is
memory: it shows the cost of the extra work, not of a real interconnect.
"""

from __future__ import annotations

import math
import re
import time

import jax
import numpy as np
from absl import flags

import jaxspeed
from experiments import common
from jaxspeed.comm.hlo import Collective, collectives
from jaxspeed.configs import gpt_tiny
from jaxspeed.moe.dropless import buffer_rows

QUICK = flags.DEFINE_bool("quick", False,
                          "Smoke run: 2 layers, d_model 64, batch 8 x seq 16, 3 steps.")
STEPS = flags.DEFINE_integer("steps", 20, "Train steps per variant.")
SLACK = flags.DEFINE_float("slack", 2.0, "moe.dispatch_slack of the padding-free variants.")
BIAS_RATE = flags.DEFINE_float("bias_update_rate", 1e-2, "moe.bias_update_rate (u).")
NUM_EXPERTS, TOP_K, GRANULARITY = 64, 8, 8
VARIANTS = {"exact": dict(), "padding_free": dict(dispatch="padding_free"),
            "dedup": dict(dedup_dispatch=True),
            "padding_free_dedup": dict(dispatch="padding_free", dedup_dispatch=True)}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                     r"=%(?P<name>[\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")


def path_collectives(hlo_text: str, num_devices: int, branch: int) -> list[Collective]:
  """The collectives of the program along one path through its conditionals.

  Every ``conditional`` runs its branch ``branch`` (``lax.cond`` lowers to
  branches [false, true]): the collectives of computations reachable from the
  entry that way, each instruction counted once, as ``jaxspeed.comm.hlo`` does.
  """
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if match := _COMPUTATION.match(line):
      current = match["name"]
      bodies[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif current is not None:
      bodies[current].append(line)
  seen, stack, found = set(), [entry], []
  while stack:
    name = stack.pop()
    if name in seen or name not in bodies:
      continue
    seen.add(name)
    for line in bodies[name]:
      stack += [m["name"] for m in _CALLEE.finditer(line)]
      if match := _BRANCHES.search(line):
        names = [n.strip().lstrip("%") for n in match["names"].split(",")]
        stack.append(names[min(branch, len(names) - 1)])
    found += collectives("\n".join(bodies[name]), num_devices)
  return found


def _config(variant: str, quick: bool, steps: int, slack: float, ep: int, bias_rate: float):
  config = gpt_tiny.get_config()
  config.update(steps=steps, sample_tokens=0, fit_parallel=False)
  config.parallel.update(data=1, fsdp=1, tensor=1, expert=ep)
  config.zero.stage = 0
  if quick:
    config.model.update(num_layers=2, d_model=64, d_ff=256)
    config.batch_size, config.seq_len = 8, 16
  config.moe.update(num_experts=NUM_EXPERTS, top_k=TOP_K, drop_tokens=False,
                    expert_d_ff=config.model.d_ff // GRANULARITY, balancing="bias",
                    bias_update_rate=bias_rate, dispatch_slack=slack, **VARIANTS[variant])
  return config


def theory_bytes(config, devices: int) -> float:
  """All-to-all bytes per device and step when the tight buffers fit (module docstring)."""
  m, moe, ep = config.model, config.moe, config.parallel.expert
  tokens = config.batch_size * config.seq_len // devices
  local = NUM_EXPERTS // ep
  slack = moe.dispatch_slack if moe.dispatch == "padding_free" else None
  rows = buffer_rows(tokens, TOP_K, local, ep, moe.dedup_dispatch, slack)
  per_row = 4 * m.d_model + (3 * min(TOP_K, local) if moe.dedup_dispatch else 1)
  return m.num_layers // moe.expert_interval * (ep - 1) * rows * per_row * 4


def _a2a_bytes(ops: list[Collective]) -> float:
  return sum(c.sent_bytes for c in ops if c.op == "all-to-all")


def run(config, steps: int, devices=None) -> dict:
  setup = jaxspeed.build(config, devices=devices)
  history, times = [], []
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    # One compilation: its text for the bytes, its executable for the steps (every step
    # has the same kind and shapes, and the objective leaves batches as they are).
    step_fn = setup.train_step.lower(state, setup.to_device(
        setup.train_data.batch_at(0))).compile()
    text = step_fn.as_text()
    for _ in range(steps):
      batch = setup.to_device(setup.train_data.next_batch())
      start = time.perf_counter()
      state, metrics = step_fn(state, batch)
      history.append(jax.device_get(metrics))
      times.append(time.perf_counter() - start)
  num = len(setup.mesh.devices.flat)
  return {"losses": [float(m["loss"]) for m in history],
          "all_to_all_bytes": _a2a_bytes(path_collectives(text, num, 0)),
          "all_to_all_bytes_fallback": _a2a_bytes(path_collectives(text, num, 1)),
          "fallbacks": int(sum(m["moe_dispatch_fallbacks"] for m in history)),
          "dropped_fraction": max(float(m["moe_dropped_fraction"]) for m in history),
          "load_imbalance": float(np.mean([np.max(m["moe_expert_tokens"])
                                           / np.mean(m["moe_expert_tokens"])
                                           for m in history])),
          "step_s": float(np.median(times[2:] or times))}


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  steps = 3 if quick else STEPS.value
  devices = jax.device_count()
  variants = ["exact", "padding_free", "dedup"] if quick else list(VARIANTS)
  start = time.perf_counter()
  settings = dict(quick=quick, steps=steps, slack=SLACK.value, bias_rate=BIAS_RATE.value)
  reference = run(_config("exact", ep=1, **settings), steps, jax.devices()[:1])
  print(f"one device: {time.perf_counter() - start:.1f} s", flush=True)
  rows = []
  for variant in variants:
    start = time.perf_counter()
    config = _config(variant, ep=devices, **settings)
    result = run(config, steps)
    print(f"{variant}: {time.perf_counter() - start:.1f} s", flush=True)
    losses = result.pop("losses")
    rows.append({"variant": variant, "ep": devices, **result,
                 "all_to_all_bytes_theory": theory_bytes(config, devices),
                 "loss_last": losses[-1],
                 "loss_rel_diff_vs_one_device": max(
                     abs(a - b) / abs(b) for a, b in zip(losses, reference["losses"]))})
  by = {r["variant"]: r for r in rows}
  layer_steps = steps * _moe_layers(quick)
  pf = by["padding_free"]
  # Per layer and step, the tight buffers' bytes, or the exact ones where they overflowed.
  pf_bytes = pf["all_to_all_bytes"] + (pf["all_to_all_bytes_fallback"] - pf[
      "all_to_all_bytes"]) * pf["fallbacks"] / layer_steps
  summary = {
      "alltoall_bytes_ratio_padding_free_vs_dropless":
          by["padding_free"]["all_to_all_bytes"] / by["exact"]["all_to_all_bytes"],
      "alltoall_bytes_ratio_dedup_vs_plain":
          by["dedup"]["all_to_all_bytes"] / by["exact"]["all_to_all_bytes"],
      "dropped_fraction": max(r["dropped_fraction"] for r in rows),
      "loss_equal_rel_diff": by["padding_free"]["loss_rel_diff_vs_one_device"],
      "alltoall_bytes_ratio_padding_free_vs_dropless_run": pf_bytes
      / by["exact"]["all_to_all_bytes"],
      "padding_free_fallbacks": pf["fallbacks"],
      "padding_free_layer_steps": layer_steps,
      "bytes_match_theory": all(math.isclose(r["all_to_all_bytes"],
                                             r["all_to_all_bytes_theory"], rel_tol=1e-9)
                                for r in rows),
      "step_time_ratio_padding_free_vs_dropless":
          by["padding_free"]["step_s"] / by["exact"]["step_s"],
  }
  header = ("Claim (X-MoE, Yuan et al. SC'25): padding-free dispatch and redundancy-bypassing "
            f"dispatch shrink the all-to-alls of fine-grained top-k MoEs. Ours: {NUM_EXPERTS} "
            f"experts of d_ff / {GRANULARITY}, top-{TOP_K}, bias balancing (u = "
            f"{BIAS_RATE.value:g}), dropless, "
            f"ep = {devices}; bytes per device and step from the compiled step along the path "
            "where the tight buffers fit (and the fallback path), beside the formula, and "
            "averaged over the layer-steps of the run (_run: fallbacks at the exact bytes); "
            f"losses of {steps} steps against one device; median step time on a shared CPU "
            "host.")
  common.write_results("xmoe", summary, rows,
                       config={**settings, "num_experts": NUM_EXPERTS, "top_k": TOP_K},
                       header=header)


def _moe_layers(quick: bool) -> int:
  """MoE layers of the model (every second layer)."""
  return (2 if quick else gpt_tiny.get_config().model.num_layers) // 2


if __name__ == "__main__":
  common.run_app(main)
