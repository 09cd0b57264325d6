"""Pipeline schedules: measured bubble against (p − 1) / (m + p − 1), and activation memory.

  python -m experiments.pipeline_bubble [--quick]

Claims: with p stages and m microbatches a step idles (p − 1) / (m + p − 1)
of the time, negligible once m ≥ 4p (GPipe, Huang et al. 2019, §2.2); 1F1B
(PipeDream-flush, Narayanan et al. 2021) has the same bubble but keeps the
activations of O(p) microbatches per stage instead of m; the interleaved
schedule with v chunks per stage cuts the bubble to (p − 1) / (v·m + p − 1)
(Narayanan et al. 2021, §2.2).

For each p in ``--stages`` on ``--cpu_devices`` = 8 devices (pipeline p x
data 8/p) and m in {p, 2p, 4p}, two train steps of the same GPT, same global
batch, same devices:

* pipeline: ``parallel.stage=p``, ``microbatches=m``, per schedule
  (``pipeline.schedule``: ``gpipe``, m + p − 1 forward iterations in which
  every stage runs its L/p layers on one microbatch of B / (m·dp) rows per
  device, then their transpose; ``1f1b``, m + 2p − 2 ticks of one forward and
  one backward pass, none of either where no stage has one; ``interleaved``,
  v·m + p − 1 iterations of L/(p·v) layers, v = 2);
* reference: ``parallel.stage=1``, ``data=8``, ``microbatches=m/p``: every
  device runs all L layers over m/p sequential microbatches of the same
  B / (m·dp) rows. The same useful FLOPs in matmuls of the same shapes, and
  no bubble.

How the bubble shows on virtual CPU devices: the 8 devices share the host's
cores, so a step's wall time measures the total work of all devices, not a
critical path with idle devices. The SPMD pipeline program has no idle slots
either: in a bubble slot a stage computes on filler, as on real hardware
(MaxText's pipeline does the same). On a GPU cluster the bubble is time the
stage waits; here it is work the shared cores do; both take (p − 1) of every
m + p − 1 slots, so ``bubble_time`` = 1 − t_reference / t_pipeline estimates
the same fraction. Every variant's step runs in alternating blocks
(``common.time_interleaved``, ``--repeats`` rounds of ``--block`` steps);
``bubble_time`` is 1 − the median over matched steps of t_reference /
t_pipeline, with quartiles (``_p25`` / ``_p75``), so a load drift widens the
spread instead of moving the median. What this
cannot show: overlap of the ``ppermute`` with compute, or link bandwidth
(collectives between virtual devices are memory copies).

The measure also holds every other overhead of the pipelined program (e.g.
the embedding and LM head run replicated on every stage, p copies), so it
sits above the theory; its change with m is the part the bubble explains.
``pipelined_vs_plain_step_ratio`` isolates that constant overhead: the step
time ratio t_pipeline / t_reference divided by the bubble's share of extra
iterations, (m + p − 1) / m; 1 means the pipeline costs only its bubble.
(Where the overhead went: the schedule ran as a ``lax.scan`` whose backward
residuals XLA zero-filled and copied in loop-carried buffers every step, and
the per-stage layer scan made XLA all-reduce every layer's gradient in every
iteration; see ``jaxspeed.parallel.pipeline``.)

All variants run with ``model.remat=full``: 1F1B recomputes a stage's forward
pass in its backward pass (it keeps only stage inputs), so with full remat
every variant does the same work per microbatch. Memory is the compiled
step's ``memory_analysis().temp_size_in_bytes`` per device (activations,
gradients and workspace; parameters and optimizer state are arguments), at
m = p, 2p, 4p for the deepest p, with ``model.remat`` none and full.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

import jaxspeed
from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.parallel import pipeline
from jaxspeed.parallel.pipeline import bubble_fraction

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 1F1B only, p = 2 and m = 4p, 4 layers, "
                          "d_model 64, seq 32, 2 rounds of 2 steps.")
STAGES = flags.DEFINE_list("stages", ["2", "4"], "Pipeline depths p to measure.")
SCHEDULES = flags.DEFINE_list("schedules", list(pipeline.SCHEDULES), "Schedules to compare.")
REPEATS = flags.DEFINE_integer("repeats", 4, "Rounds of alternating blocks of steps.")
BLOCK = flags.DEFINE_integer("block", 2, "Consecutive timed steps of a variant per round.")
MULTIPLES = flags.DEFINE_list("microbatch_multiples", ["1", "2", "4"],
                              "Microbatch counts m as multiples of p.")
BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch; divisible by 8 and by m·dp.")


def _config(quick: bool, stages: int, microbatches: int, schedule: str = "gpipe",
            remat: str = "full"):
  """The GPT of ``configs/gpt_tiny.py`` with 8 layers (4 in quick mode)."""
  config = gpt_tiny.get_config()
  config.zero.stage = 0
  config.model.remat = remat
  config.pipeline.schedule = schedule
  config.batch_size = BATCH.value
  config.model.num_layers = 8
  if quick:
    config.model.update(num_layers=4, d_model=64, d_ff=256)
    config.seq_len = config.model.max_seq_len = 32
  devices = common.CPU_DEVICES.value
  config.parallel.update(data=devices // stages, fsdp=1, tensor=1, stage=stages)
  config.microbatches = microbatches
  return config


class Variant:
  """A built train step with its own state and batch; calling it runs one step."""

  def __init__(self, config):
    self.setup = jaxspeed.build(config)
    with jax.set_mesh(self.setup.mesh):
      self.state = self.setup.init_state()
      self.batch = self.setup.to_device(self.setup.train_data.batch_at(0))
      compiled = self.setup.train_step.lower(self.state, self.batch).compile()
    self.temp_bytes = compiled.memory_analysis().temp_size_in_bytes

  def __call__(self) -> None:
    with jax.set_mesh(self.setup.mesh):  # the step donates its state: carry the new one
      self.state, metrics = self.setup.train_step(self.state, self.batch, 0)
      jax.block_until_ready((self.state, metrics))


def _temp_bytes(quick: bool, stages: int, microbatches: int, schedule: str, remat: str) -> int:
  """Per-device temporaries of the compiled train step (no step is run)."""
  setup = jaxspeed.build(_config(quick, stages, microbatches, schedule, remat))
  with jax.set_mesh(setup.mesh):
    state = setup.abstract_state()
    batch = setup.to_device(setup.train_data.batch_at(0))
    return setup.train_step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  stages = [2] if quick else [int(p) for p in STAGES.value]
  schedules = ["1f1b"] if quick else SCHEDULES.value
  repeats, block = (2, 2) if quick else (REPEATS.value, BLOCK.value)
  per_stage = (4,) if quick else tuple(int(k) for k in MULTIPLES.value)  # m / p
  pipelines = {(s, p, k * p): Variant(_config(quick, p, k * p, s))
               for s in schedules for p in stages for k in per_stage}
  references = {k: Variant(_config(quick, 1, k)) for k in per_stage}
  # Interleaved, so drift on the shared host hits all alike; the first call compiles.
  seconds = common.time_interleaved({**{key: pipe for key, pipe in pipelines.items()},
                                     **{("reference", k): ref for k, ref in references.items()}},
                                    repeats, block)

  rows = []
  for (schedule, p, m), pipe in pipelines.items():
    pipe_s, ref_s = seconds[(schedule, p, m)], seconds[("reference", m // p)]
    t_pipe, t_ref = float(np.median(pipe_s)), float(np.median(ref_s))
    kept = common.ratio_spread(ref_s, pipe_s)  # t_ref / t_pipe per matched step
    virtual = pipe.setup.config.pipeline.virtual_stages if schedule == "interleaved" else 1
    theory = bubble_fraction(p, m, virtual)
    rows.append({
        "schedule": schedule, "stages_p": p, "virtual_stages_v": virtual, "microbatches_m": m,
        "data_parallel": common.CPU_DEVICES.value // p,
        "rows_per_microbatch_per_device": pipe.setup.config.batch_size
        // (m * common.CPU_DEVICES.value // p),
        "pipeline_step_s": t_pipe, "reference_step_s": t_ref,
        "bubble_time": 1 - kept["median"],
        "bubble_time_p25": 1 - kept["p75"], "bubble_time_p75": 1 - kept["p25"],
        "bubble_theory": theory, "time_vs_theory": (1 - kept["median"]) / theory,
        "time_vs_theory_p25": (1 - kept["p75"]) / theory,
        "time_vs_theory_p75": (1 - kept["p25"]) / theory,
        "pipelined_vs_plain_step_ratio": t_pipe / t_ref * m / (m + p - 1),
        "temp_mb_remat_full": pipe.temp_bytes / 2**20,
    })
  deepest = max(stages)
  at_4p = {r["schedule"]: r for r in rows
           if r["stages_p"] == deepest and r["microbatches_m"] == 4 * deepest}
  # Activation memory at m = 4p without remat: what each schedule keeps for its backward passes.
  # (Skipped in quick mode: two more compilations.)
  no_remat = {} if quick else {s: _temp_bytes(quick, deepest, 4 * deepest, s, "none")
                               for s in schedules}
  summary = {
      "bubble_measured_vs_theory": at_4p[schedules[0]]["time_vs_theory"],
      "bubble_measured_4p": at_4p[schedules[0]]["bubble_time"],
      "bubble_theory_4p": at_4p[schedules[0]]["bubble_theory"],
      "pipelined_vs_plain_step_ratio": at_4p[schedules[0]]["pipelined_vs_plain_step_ratio"],
      **{f"bubble_measured_vs_theory_{s}{q}": at_4p[s][f"time_vs_theory{q}"]
         for s in schedules for q in ("", "_p25", "_p75")},
      **{f"temp_mb_no_remat_{s}_4p": b / 2**20 for s, b in no_remat.items()},
      "stages_at_4p": deepest,
      "timed_steps_per_variant": repeats * block,
      "claim": "bubble (p-1)/(m+p-1), negligible for m >= 4p (GPipe); 1F1B: same bubble, "
               "O(p) microbatches of activations per stage; interleaved: (p-1)/(v m+p-1)",
  }
  if {"gpipe", "1f1b"} <= set(schedules):
    if no_remat:
      summary["peak_activation_ratio_1f1b_vs_gpipe"] = no_remat["1f1b"] / no_remat["gpipe"]
    summary["peak_activation_ratio_1f1b_vs_gpipe_remat_full"] = (
        at_4p["1f1b"]["temp_mb_remat_full"] / at_4p["gpipe"]["temp_mb_remat_full"])
    summary["stored_microbatches_1f1b_vs_gpipe_theory"] = (
        min(2 * deepest - 1, 4 * deepest) / (4 * deepest))
  base = _config(quick, 1, 1)
  header = (
      f"GPT, {base.model.num_layers} layers, d_model {base.model.d_model}, seq {base.seq_len}, "
      f"global batch {base.batch_size}, {common.CPU_DEVICES.value} virtual CPU devices, "
      "model.remat=full. pipeline: stage=p x data=8/p with m microbatches, per schedule; "
      "reference: stage=1 x data=8 "
      "with m/p sequential microbatches (same rows per matmul, same useful FLOPs, no bubble). "
      f"bubble_time = 1 − t_ref / t_pipe, the median over matched steps of {repeats} rounds of "
      f"alternating blocks of {block} steps per variant (_p25/_p75: its quartiles); theory "
      "(p−1)/(m+p−1) (GPipe; paper: negligible for m >= 4p). Virtual devices share the "
      "host's cores, so the bubble shows as filler work the cores do rather than idle time "
      "on a device: the same share of slots, but overlap of sends with compute and link "
      "bandwidth are not visible here. The measure includes the pipeline's other overheads "
      "(p copies of embedding/LM head); pipelined_vs_plain_step_ratio = (t_pipe / t_ref) · "
      "m / (m + p − 1) is that constant overhead alone (1 = only the bubble). temp_mb: the "
      "compiled step's per-device temporaries (memory_analysis); the summary's no-remat "
      "figures are at m = 4p for the deepest p. 1F1B keeps min(2p − 1, m) stage inputs per "
      "stage (lockstep ticks; DeepSpeed's unit-time 1F1B keeps p), GPipe all m microbatches' "
      "activations.")
  config = _config(quick, deepest, 4 * deepest, schedules[-1])
  common.write_results("pipeline_bubble", summary, rows, config.to_dict(), header)


if __name__ == "__main__":
  app.run(main)
