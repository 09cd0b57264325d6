"""Random-LTD: FLOPs and wall-clock saved by random layerwise token dropping, at what quality.

  python -m experiments.random_ltd [--quick]

Claim (Yao et al. 2022, arXiv 2211.11586; DeepSpeed's random-LTD tutorial): up
to 33.3% theoretical and 25.6% wall-clock cost saving at similar quality.

Two runs of the GPT of ``configs/gpt_tiny.py`` (4 layers) on
``--cpu_devices`` data-parallel workers, same data and steps:

* baseline: every layer sees all S = ``seq_len`` tokens; LR schedule in steps;
* random-LTD (``data_efficiency.random_ltd``): the middle L − 2 layers each run
  on r random tokens per sequence, r growing from S/4 to S over
  ``--require_fraction`` of the steps in multiples of 16 (``seq_per_step``);
  LR schedule in layer-tokens (``optim.lr_unit="layer_tokens"``, warm-up and
  decay counted in the tokens the layers actually process).

FLOPs are read from XLA: ``compiled.cost_analysis()["flops"]`` of the train
step (per device) compiled for each distinct kept length r, against the
baseline's one program (the same for every step index). The whole-run
saving weights each r by the number of steps at it: ``flops_saving`` =
1 − Σ_t F(r_t) / (steps · F(S)) (steps at r = S reuse the baseline's F(S)).

Theory: the forward FLOPs per token of a layer that attends over n tokens are
f(n) = 8d² + 4·d·d_ff + 4·n·d (QKV and output projections 8d², MLP
4·d·d_ff — 24d² at d_ff = 4d — and attention scores plus weighted sum 4nd,
computed over the full n x n causal square), and the tied LM head costs 2·d·V
per token; training is 3x forward, the same factor for both runs (this is
``ModelConfig.flops_per_token``: 6N + 12·L·S·d). Per sequence:

  F(S) ∝ S·(L·f(S) + 2dV),   F(r) ∝ S·(2·f(S) + 2dV) + (L − 2)·r·f(r).

``flops_saving_theory`` applies the same step weighting to these. Measured and
theoretical savings should agree within 5% (``flops_saving_rel_error``; the
rest is elementwise work, the optimizer update and the gathers/scatters).

Wall clock, timed after both runs in one process: the baseline's train step
and random-LTD's step at each kept length r < S, all compiled first, run on
one fixed batch in alternating blocks (``common.time_interleaved``), so every
program sees the same load. Per matched round i, the run's time is
Σ_r n_r·t_r[i] (steps at r = S take the baseline's t[i]) against
steps · t_baseline[i]: ``wallclock_saving`` is 1 − the median of that ratio,
``wallclock_saving_p25`` / ``_p75`` its quartiles (a load swing widens them
rather than moving the median). ``wallclock_saving_loop`` is the raw
1 − (loop_s − compile_s) ratio of the two training runs, run one after the
other (evaluation included in both, tracing of each new program too): it moves
with the host's load.
``val_loss_rel_gap`` = final validation loss of random-LTD / baseline − 1.
"""

from __future__ import annotations

import collections
import os

import jax
import numpy as np
from absl import flags

import jaxspeed
from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.errors import FlagError
from jaxspeed.training import plot_runs
from jaxspeed.training.trainer import layer_dropping

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 3-layer model, seq 64, kept lengths 16 and "
                          "32, 12 steps.")
STEPS = flags.DEFINE_integer("steps", 300, "Training steps of both runs.")
REQUIRE_FRACTION = flags.DEFINE_float(
    "require_fraction", 0.7, "Share of the steps over which the kept length reaches S.")
MIN_FRACTION = flags.DEFINE_float("min_fraction", 0.25, "First kept length, as a share of S.")
SEQ_PER_STEP = flags.DEFINE_integer("seq_per_step", 16, "Kept lengths are multiples of this.")
TIMING_ROUNDS = flags.DEFINE_integer("timing_rounds", 12, "Rounds of alternating blocks of the "
                                     "step-time comparison.")
TIMING_BLOCK = flags.DEFINE_integer("timing_block", 3, "Consecutive timed steps of a program "
                                    "per round.")


def _config(quick: bool, steps: int, ltd: bool):
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1)
  config.zero.stage = 0
  config.sample_tokens = 0
  config.steps = steps
  config.log_every = 1  # per-step times for the wall-clock comparison
  config.eval_every = max(1, steps // 6)
  config.checkpoint_every = steps
  config.eval_batches = 4
  if quick:
    config.model.update(num_layers=3, d_model=64, d_ff=256)
    config.seq_len = config.model.max_seq_len = 64
    config.eval_batches = 2
  config.optim.warmup = max(1, steps // 10)
  if ltd:
    s = config.seq_len
    config.data_efficiency.random_ltd.update(
        enabled=True, min_value=max(1, round(MIN_FRACTION.value * s)), max_value=s,
        require_steps=max(1, round(REQUIRE_FRACTION.value * steps)),
        seq_per_step=s // 2 if quick else SEQ_PER_STEP.value)
    # Warm up over the layer-tokens of the same number of full steps.
    config.optim.update(lr_unit="layer_tokens", warmup=config.optim.warmup * config.batch_size
                        * s * config.model.num_layers)
  return config


def kept_lengths(config) -> list[int]:
  """Kept length r of every step of a random-LTD run of ``config``."""
  kept_at = layer_dropping(config).kept_length_at
  return [kept_at(t) for t in range(config.steps)]


def step_flops(config, steps: list[int]) -> dict[int, float]:
  """XLA's per-device FLOPs of the train step compiled for each step index in ``steps``."""
  setup = jaxspeed.build(config)
  flops = {}
  with jax.set_mesh(setup.mesh):
    state = setup.abstract_state()
    batch = setup.to_device(setup.train_data.batch_at(0))
    for step in steps:
      cost = setup.train_step.lower(state, batch, step).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops[step] = float(cost["flops"])
  return flops


class StepCall:
  """One train step of ``config`` at step index ``step`` on a fixed batch, on its own state."""

  def __init__(self, config, step: int):
    self.setup, self.step = jaxspeed.build(config), step
    with jax.set_mesh(self.setup.mesh):
      self.state = self.setup.init_state()
      self.batch = self.setup.to_device(self.setup.train_data.batch_at(0))

  def __call__(self) -> None:
    with jax.set_mesh(self.setup.mesh):  # the step donates its state: carry the new one
      self.state, metrics = self.setup.train_step(self.state, self.batch, self.step)
      jax.block_until_ready((self.state, metrics))


def interleaved_step_seconds(configs: dict, first_step: dict[int, int], rounds: int,
                             block: int) -> dict[int | str, np.ndarray]:
  """Seconds per step of the baseline and of random-LTD at each kept length, interleaved."""
  calls = {"baseline": StepCall(configs["baseline"], 0),
           **{r: StepCall(configs["random_ltd"], t) for r, t in first_step.items()}}
  return common.time_interleaved(calls, rounds, block, warmup=2)


def theory_flops(config, kept: int) -> float:
  """Forward FLOPs of one sequence (see the module docstring): full layers, r-token layers."""
  m = config.model
  s, d, layers = config.seq_len, m.d_model, m.num_layers
  per_token = lambda n: 8 * d * d + 4 * d * m.d_ff + 4 * n * d
  head = 2 * d * m.vocab_size
  if kept >= s:
    return s * (layers * per_token(s) + head)
  return s * (2 * per_token(s) + head) + (layers - 2) * kept * per_token(kept)


def main(argv):
  del argv
  for holder in (TIMING_ROUNDS, TIMING_BLOCK):
    if holder.value < 1:
      raise FlagError(holder.name, f"must be >= 1, got {holder.value}")
  common.setup_devices()
  quick = QUICK.value
  steps = 12 if quick else STEPS.value
  configs = {"baseline": _config(quick, steps, ltd=False), "random_ltd": _config(quick, steps,
                                                                                 ltd=True)}
  seq_len = configs["baseline"].seq_len

  # FLOPs per step of each distinct kept length, from the compiled programs.
  lengths = kept_lengths(configs["random_ltd"])
  counts = collections.Counter(lengths)
  first_step = {r: lengths.index(r) for r in counts if r < seq_len}
  base_flops = step_flops(configs["baseline"], [0])[0]
  ltd_flops = step_flops(configs["random_ltd"], sorted(first_step.values()))
  measured = {r: ltd_flops[t] for r, t in first_step.items()}
  measured[seq_len] = base_flops
  base_theory = theory_flops(configs["baseline"], seq_len)
  rows = []
  for r in sorted(counts):
    saving = 1 - measured[r] / base_flops
    theory = 1 - theory_flops(configs["baseline"], r) / base_theory
    rows.append({"kind": f"step flops, r={r}", "kept_length": r, "steps_at_r": counts[r],
                 "flops_per_device": measured[r], "flops_saving": saving,
                 "flops_saving_theory": theory,
                 "rel_error": saving / theory - 1 if theory else 0.0})
  run_flops = sum(counts[r] * measured[r] for r in counts)
  run_theory = sum(counts[r] * theory_flops(configs["baseline"], r) for r in counts)
  flops_saving = 1 - run_flops / (steps * base_flops)
  flops_saving_theory = 1 - run_theory / (steps * base_theory)

  out = os.path.join(common.OUTPUT_DIR.value, "random_ltd")
  runs, curves = {}, {}
  for label, config in configs.items():
    runs[label], curves[label] = common.fresh_run(config, os.path.join(out, label))
  compute_s = {k: v["loop_s"] - v["compile_s"] for k, v in runs.items()}
  rounds, block = (2, 2) if quick else (TIMING_ROUNDS.value, TIMING_BLOCK.value)
  seconds = interleaved_step_seconds(configs, first_step, rounds, block)
  seconds[seq_len] = seconds["baseline"]  # steps at r = S run the baseline's program
  ltd_run_s = sum(counts[r] * seconds[r] for r in counts)  # per matched round
  spread = common.ratio_spread(ltd_run_s, steps * seconds["baseline"])
  for row in rows:
    row["median_step_s"] = float(np.median(seconds[row["kept_length"]]))
  for label, summary in runs.items():
    rows.append({"kind": f"run {label}", "kept_length": "schedule" if label != "baseline"
                 else seq_len, "steps_at_r": steps, "val_loss": summary["val_loss"],
                 "loop_s": summary["loop_s"], "compile_s": summary["compile_s"],
                 "compute_s": compute_s[label],
                 "compilations": summary["train_step_compilations"],
                 "median_step_s": float(np.median(seconds["baseline"]))
                 if label == "baseline" else float("nan")})
  keys = ("kind", "kept_length", "steps_at_r", "flops_per_device", "flops_saving",
          "flops_saving_theory", "rel_error", "median_step_s", "val_loss", "loop_s",
          "compile_s", "compute_s", "compilations")
  rows = [{k: row.get(k, float("nan")) for k in keys} for row in rows]  # one table

  val = {k: v["val_loss"] for k, v in runs.items()}
  ltd = configs["random_ltd"].data_efficiency.random_ltd
  summary = {
      "flops_saving": flops_saving,
      "flops_saving_theory": flops_saving_theory,
      "flops_saving_rel_error": flops_saving / flops_saving_theory - 1,
      "flops_match_within_5pct": abs(flops_saving / flops_saving_theory - 1) <= 0.05,
      "max_rel_error_per_length": max(abs(r["rel_error"]) for r in rows
                                      if isinstance(r["kept_length"], int)),
      "wallclock_saving": 1 - spread["median"],
      "wallclock_saving_p25": 1 - spread["p75"],
      "wallclock_saving_p75": 1 - spread["p25"],
      "timed_steps_per_program": rounds * block,
      "wallclock_saving_loop": 1 - compute_s["random_ltd"] / compute_s["baseline"],
      "val_loss_rel_gap": val["random_ltd"] / val["baseline"] - 1,
      "baseline_val_loss": val["baseline"],
      "random_ltd_val_loss": val["random_ltd"],
      "random_ltd_compilations": runs["random_ltd"]["train_step_compilations"],
      "random_ltd_compile_s": runs["random_ltd"]["compile_s"],
      "baseline_compile_s": runs["baseline"]["compile_s"],
      "steps": steps,
      "schedule": f"r {ltd.min_value} -> {ltd.max_value} over {ltd.require_steps} steps, "
                  f"multiples of {ltd.seq_per_step}",
      "claim": "33.3% theoretical, 25.6% wall-clock saving at similar quality",
  }
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "random_ltd.png"), key="val_loss")
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "random_ltd_train.png"))
  model = configs["baseline"].model
  header = (
      f"GPT, {model.num_layers} layers, d_model {model.d_model}, S = {seq_len}: baseline vs "
      f"random-LTD (middle {model.num_layers - 2} layers keep r tokens, {summary['schedule']}; "
      "layer-token LR schedule), same steps and data. FLOPs per device from XLA's "
      "cost_analysis of the compiled train step per kept length; theory from per-layer "
      "forward FLOPs 8d² + 4·d·d_ff + 4·n·d per token plus the 2dV head. Whole-run savings "
      "weight each r by its steps. Wall clock: after training, the baseline step and each "
      f"kept length's step timed on one batch in {rounds} rounds of alternating blocks of "
      f"{block} steps; wallclock_saving = 1 − median over rounds of Σ_r n_r·t_r / "
      "(steps·t_baseline), _p25/_p75 its quartiles; median_step_s: median step time per "
      "program (wallclock_saving_loop: loop_s − compile_s of the two runs, one after the "
      "other, so it moves with the host's load). Paper: 33.3% "
      "theoretical, 25.6% wall-clock saving at similar quality. Curves: random_ltd.png "
      "(validation), random_ltd_train.png.")
  common.write_results("random_ltd", summary, rows, configs["random_ltd"].to_dict(), header)


if __name__ == "__main__":
  common.run_app(main)
