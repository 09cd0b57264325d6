"""Sequence-length warm-up (SLW) at a large batch and a high learning rate.

  python -m experiments.slw_stability [--quick] [--sweep]

Claim (Li et al. 2022, "The Stability-Efficiency Dilemma", arXiv 2108.06084;
DeepSpeed's curriculum tutorial): warming up the sequence length keeps GPT
pretraining stable at an 8x larger batch and 4x larger learning rate, where the
baseline's loss spikes, and reaches the same validation loss with up to 2.2x
fewer tokens.

Two runs of the GPT of ``configs/gpt_tiny.py`` on ``--cpu_devices``
data-parallel workers, at batch ``--batch_size`` and peak LR ``--lr`` with a
short warm-up, Adam beta2 ``--b2`` 0.999 (Megatron's GPT-2 setting, the
paper's) and global-norm clipping ``--grad_clip`` 1.0 (the paper keeps it):

* baseline: full sequences (``seq_len``) for ``--steps`` steps;
* slw: ``data_efficiency.seqlen`` on, ``seqlen_truncate``, the length ramping
  linearly from ``--slw_min`` tokens to ``seq_len`` over ``--slw_fraction`` of
  its steps. The ramp is rounded down to the powers of two (8, 16, 32, 64, 128)
  by a ``fixed_discrete`` schedule (``slw_schedule``): the train step compiles
  once per length, and five lengths cost a fraction of the sixteen of a
  ``fixed_linear`` ramp with ``difficulty_step`` 8 (``--slw_lengths=step8``),
  and it loads the full-length programs the baseline compiled from a compilation
  cache (``--compilation_cache``). It gets the baseline's token budget (the
  tutorial ends runs by tokens), so it runs more, shorter steps.

Both count the learning-rate schedule in tokens (``optim.lr_unit="tokens"``):
warm-up is ``--warmup_steps`` full baseline batches of tokens and the cosine
decay spans the baseline's token budget, so LR(tokens) is the same curve in both runs
(under SLW the warm-up covers more, shorter steps, as the tutorial intends).

Measures, from ``metrics.jsonl`` (the training loss is logged every step):

* ``*_spikes``: loss-spike events. Step t is a spike step if its training loss
  is not finite or exceeds (1 + ``--spike_threshold``) x the minimum of the
  training losses logged before it (the paper's "loss ratio"). Every step after
  the first counts: at a high LR the instability SLW targets comes early, right
  after the LR warm-up. A spike event is a maximal run of consecutive spike
  steps.
* ``*_diverged``: the run stopped on non-finite steps, or its final validation
  loss is not finite or is not below the untrained model's.
* tokens to reach the target validation loss (``--target_val_loss``, default
  the baseline's final validation loss), linearly interpolated between
  consecutive evaluations (the untrained model's loss at 0 tokens first);
  ``token_ratio_to_target`` = baseline tokens / SLW tokens (> 1: SLW needs
  fewer; NaN if a run never reaches the target).
* compilations and ``compile_fraction``: the SLW run's compile seconds over its
  training-loop seconds, both from the run's own summary.

``--sweep`` runs the pair at every ``--sweep_lrs`` x ``--sweep_batches`` for
``--sweep_steps`` baseline steps instead, and writes ``slw_stability_sweep``:
spikes, divergence and final losses of both runs per cell.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import jax
from absl import flags

from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.errors import FlagError, RunError
from jaxspeed.training import plot_runs, read_metrics

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 2-layer model, seq 32, 30 steps.")
STEPS = flags.DEFINE_integer("steps", 120, "Baseline steps; SLW runs until the same tokens.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch (sequences) of both runs.")
LR = flags.DEFINE_float("lr", 4.8e-2, "Peak learning rate of both runs.")
WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 2,
                                    "LR warm-up, in full baseline batches of tokens.")
B2 = flags.DEFINE_float("b2", 0.999, "Adam beta2 of both runs.")
EPS = flags.DEFINE_float("eps", 1e-8, "Adam epsilon of both runs.")
GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global-norm gradient clipping of both runs.")
SLW_FRACTION = flags.DEFINE_float("slw_fraction", 0.4,
                                  "Share of the SLW run's steps over which the length grows.")
SLW_MIN = flags.DEFINE_integer("slw_min", 8, "First sequence length of the warm-up.")
SLW_LENGTHS = flags.DEFINE_enum(
    "slw_lengths", "pow2", ["pow2", "step8"],
    "SLW lengths: the linear ramp rounded down to powers of two (one program each), or to "
    "multiples of 8 (fixed_linear, difficulty_step 8: seq_len / 8 programs).")
POSITION = flags.DEFINE_enum(
    "position", "learned", ["learned", "rope", "alibi"],
    "model.position of both runs. Learned rows of positions SLW has not reached yet get no "
    "gradient until the length reaches them.")
SPIKE_THRESHOLD = flags.DEFINE_float(
    "spike_threshold", 0.2, "A spike: training loss above (1 + this) x the running minimum.")
TARGET_VAL_LOSS = flags.DEFINE_float(
    "target_val_loss", 0.0, "Target validation loss; 0 uses the baseline's final one.")
COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True,
    "Cache compiled programs in <output_dir>/slw_stability/compilation_cache, emptied at the "
    "start: SLW reuses the baseline's full-length train and evaluation programs.")
SWEEP = flags.DEFINE_bool("sweep", False, "Run the lr x batch sweep instead of one pair.")
SWEEP_LRS = flags.DEFINE_list("sweep_lrs", ["1.2e-2", "4.8e-2", "9.6e-2"],
                              "Peak learning rates of the sweep.")
SWEEP_BATCHES = flags.DEFINE_list("sweep_batches", ["64", "16"], "Global batches of the sweep.")
SWEEP_STEPS = flags.DEFINE_integer("sweep_steps", 30, "Baseline steps of each sweep run.")


def pow2_lengths(shortest: int, longest: int) -> list[int]:
  """``shortest``, doubling, then ``longest``: [8, 16, 32, 64, 128] for (8, 128)."""
  lengths = [shortest]
  while lengths[-1] * 2 < longest:
    lengths.append(lengths[-1] * 2)
  return [*lengths, longest] if lengths[-1] < longest else lengths


def slw_schedule(shortest: int, longest: int, total: int, kind: str) -> dict[str, Any]:
  """``data_efficiency.seqlen`` schedule keys: a linear ramp over ``total`` curriculum steps.

  ``step8`` is DeepSpeed's ``fixed_linear`` with ``difficulty_step`` 8. ``pow2`` rounds
  the same ramp, d(t) = floor(min + (max - min) t / T), down to ``pow2_lengths``: length
  L_i is used until d(t) reaches L_(i+1), at t = ceil((L_(i+1) - min) T / (max - min)),
  so ``max_steps`` holds that t - 1 (a ``fixed_discrete`` schedule, one program per
  length). Rounding down keeps every step at or below the ramp's length.
  """
  if kind == "step8":
    return dict(schedule_type="fixed_linear", min_difficulty=shortest, max_difficulty=longest,
                difficulty_step=8, total_curriculum_step=total)
  lengths = pow2_lengths(shortest, longest)
  span = longest - shortest
  max_steps = []
  for length in lengths[1:]:
    last = -(-(length - shortest) * total // span) - 1
    # A short ramp can reach two lengths in one step: keep each length for one step at least.
    max_steps.append(max(last, max_steps[-1] + 1) if max_steps else max(last, 0))
  return dict(schedule_type="fixed_discrete", min_difficulty=shortest, max_difficulty=longest,
              difficulties=lengths, max_steps=max_steps)


def _config(quick: bool, steps: int, slw: bool, lr: float, batch_size: int, evals: int = 20):
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1)
  config.zero.stage = 0
  config.sample_tokens = 0
  config.batch_size = batch_size
  config.eval_batches = 2
  if quick:
    config.model.update(num_layers=2, d_model=64, d_ff=256)
    config.seq_len = config.model.max_seq_len = 32
  config.model.position = POSITION.value
  config.steps = steps
  config.log_every = 1
  config.eval_every = 2 if quick else max(1, steps // evals)
  config.checkpoint_every = steps
  # A diverging run is a result here: let the non-finite guard skip steps until the end.
  config.max_consecutive_skips = steps
  tokens_per_batch = config.batch_size * config.seq_len
  config.optim.update(learning_rate=lr, lr_unit="tokens", grad_clip=GRAD_CLIP.value,
                      b2=B2.value, eps=EPS.value, warmup=WARMUP_STEPS.value * tokens_per_batch)
  if slw:
    config.data_efficiency.seqlen.update(
        enabled=True, mode="seqlen_truncate",
        **slw_schedule(SLW_MIN.value, config.seq_len, max(1, round(SLW_FRACTION.value * steps)),
                       SLW_LENGTHS.value))
  return config


def _pair(quick: bool, steps: int, lr: float, batch_size: int, evals: int = 20
          ) -> dict[str, Any]:
  """Baseline and SLW configs; SLW takes the fewest steps that reach the baseline's tokens."""
  base = _config(quick, steps, False, lr, batch_size, evals)
  budget = common.run_tokens(base)
  slw_steps = steps
  while common.run_tokens(_config(quick, slw_steps, True, lr, batch_size, evals)) < budget:
    slw_steps += 1
  pair = {"baseline": base, "slw": _config(quick, slw_steps, True, lr, batch_size, evals)}
  for config in pair.values():
    # Both decay over the baseline's tokens: the same LR(tokens) curve, and the same
    # full-length program, which the SLW run then loads from the compilation cache.
    config.optim.decay = budget - config.optim.warmup
  return pair


def spike_steps(records: list[dict], threshold: float) -> list[int]:
  """Steps whose loss is non-finite or > (1 + threshold) x the minimum logged before them."""
  spikes, running_min = [], math.inf
  for r in sorted((r for r in records if "loss" in r), key=lambda r: r["step"]):
    loss = r["loss"]
    if not math.isfinite(loss) or loss > (1 + threshold) * running_min:
      spikes.append(int(r["step"]))
    if math.isfinite(loss):
      running_min = min(running_min, loss)
  return spikes


def max_loss_ratio(records: list[dict]) -> float:
  """The largest training loss / minimum of the losses before it (the paper's loss ratio)."""
  ratio, running_min = 1.0, math.inf
  for r in sorted((r for r in records if "loss" in r), key=lambda r: r["step"]):
    loss = r["loss"]
    if not math.isfinite(loss):
      return math.inf
    ratio, running_min = max(ratio, loss / running_min), min(running_min, loss)
  return ratio


def spike_events(steps: list[int]) -> int:
  """Maximal runs of consecutive spike steps."""
  return sum(1 for i, s in enumerate(steps) if i == 0 or s != steps[i - 1] + 1)


def tokens_to_target(records: list[dict], initial_val_loss: float, target: float) -> float:
  """Tokens at which validation loss first reaches ``target``, interpolated; NaN if never."""
  points = [(0.0, initial_val_loss)] + [(r["tokens_seen"], r["val_loss"]) for r in records
                                        if "val_loss" in r]
  return common.first_reach(points, target)


def _train(label: str, config, workdir: str) -> tuple[dict[str, Any], list[dict]]:
  """One run's row (without target tokens) and its metric records; a stopped run diverged."""
  try:
    summary, records = common.fresh_run(config, workdir)
    stopped = ""
  except RunError as e:
    if "not finite" not in str(e):  # a failed save, not the run's own divergence
      raise
    # Non-finite steps: the guard kept the last finite parameters.
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    summary = {"val_loss": math.nan, "initial_val_loss": math.nan, "skipped_steps": -1,
               "final_loss": records[-1]["loss"] if records else math.nan,
               "tokens_seen": records[-1]["tokens_seen"] if records else 0,
               "train_step_compilations": -1, "compile_s": math.nan, "loop_s": math.nan}
    stopped = str(e).split(":")[0]
  spikes = spike_steps(records, SPIKE_THRESHOLD.value)
  val = summary["val_loss"]
  return {
      "run": label, "steps": config.steps, "tokens_seen": summary["tokens_seen"],
      "val_loss": val, "initial_val_loss": summary["initial_val_loss"],
      "final_train_loss": summary["final_loss"],
      "diverged": bool(stopped) or not math.isfinite(val) or val >= summary["initial_val_loss"],
      "stopped": stopped,
      "spikes": spike_events(spikes), "spike_steps": len(spikes),
      "first_spike_step": spikes[0] if spikes else 0,
      "max_loss_ratio": max_loss_ratio(records),
      "skipped_steps": summary["skipped_steps"],
      "compilations": summary["train_step_compilations"],
      "compile_s": summary["compile_s"], "loop_s": summary["loop_s"],
      "compile_share": summary["compile_s"] / summary["loop_s"],
  }, records


def _check_flags() -> tuple[list[float], list[int]]:
  try:
    lrs = [float(v) for v in SWEEP_LRS.value]
  except ValueError:
    raise FlagError("sweep_lrs", f"must be numbers, got {','.join(SWEEP_LRS.value)}") from None
  if not lrs or min(lrs) <= 0:
    raise FlagError("sweep_lrs", f"must be positive, got {','.join(SWEEP_LRS.value)}")
  if not all(v.isdigit() and int(v) > 0 for v in SWEEP_BATCHES.value) or not SWEEP_BATCHES.value:
    raise FlagError("sweep_batches",
                    f"must be positive integers, got {','.join(SWEEP_BATCHES.value)}")
  return lrs, [int(v) for v in SWEEP_BATCHES.value]


def _header(configs: dict[str, Any], lr: str) -> str:
  base, slw = configs["baseline"], configs["slw"]
  lengths = slw.data_efficiency.seqlen
  ramp = (f"{SLW_MIN.value} -> {slw.seq_len} tokens over {SLW_FRACTION.value:.0%} of its steps, "
          + ("rounded down to powers of two" if SLW_LENGTHS.value == "pow2"
             else "in multiples of 8") + f" ({lengths.schedule_type})")
  return (
      f"GPT of configs/gpt_tiny.py (seq {base.seq_len}) at peak LR {lr} with a "
      f"{WARMUP_STEPS.value}-batch LR warm-up, Adam beta2 {B2.value:g}, eps {EPS.value:g}, "
      f"global-norm clipping {GRAD_CLIP.value:g}, with and without sequence-length warm-up "
      f"({ramp}; same token budget, LR schedule in tokens). Spike: training loss > "
      f"(1 + {SPIKE_THRESHOLD.value:g}) x the minimum of the losses before it (spikes counts "
      "events, runs of consecutive spike steps). Diverged: stopped on non-finite steps, or "
      "final validation loss not below the untrained model's.")


def run_sweep(quick: bool, out: str) -> None:
  """Both runs at every lr x batch cell; the report is rewritten after each cell."""
  lrs, batches = _check_flags()
  steps = 30 if quick else SWEEP_STEPS.value
  rows, curves = [], {}
  for batch in batches:
    for lr in lrs:
      # Five evaluations: the spikes are read from the training loss of every step.
      pair = _pair(quick, steps, lr, batch, evals=5)
      for label, config in pair.items():
        row, records = _train(label, config, os.path.join(out, f"b{batch}_lr{lr:g}", label))
        rows.append({"lr": lr, "batch_size": batch, **row})
        curves[f"{label} b{batch} lr{lr:g}"] = records
      _write_sweep(rows, curves, pair, steps, lrs)


def _write_sweep(rows: list[dict], curves: dict[str, list[dict]], pair: dict[str, Any],
                 steps: int, lrs: list[float]) -> None:
  pick = lambda label, key: [r[key] for r in rows if r["run"] == label]
  summary = {
      "cells": len(rows) // 2,
      "baseline_cells_spiking": sum(s > 0 for s in pick("baseline", "spikes")),
      "slw_cells_spiking": sum(s > 0 for s in pick("slw", "spikes")),
      "baseline_cells_diverged": sum(pick("baseline", "diverged")),
      "slw_cells_diverged": sum(pick("slw", "diverged")),
      "baseline_spikes": sum(pick("baseline", "spikes")),
      "slw_spikes": sum(pick("slw", "spikes")),
  }
  top = f"lr{max(lrs):g}"
  png = os.path.join(common.OUTPUT_DIR.value, "slw_stability_sweep.png")
  plot_runs({k: v for k, v in curves.items() if k.endswith(top)}, png, x="tokens_seen")
  header = (_header(pair, "per row") + f" Each cell: baseline {steps} steps, SLW the same "
            "tokens. Training curves at the largest LR: slw_stability_sweep.png.")
  common.write_results("slw_stability_sweep", summary, rows, pair["slw"].to_dict(), header)


def use_compilation_cache(directory: str) -> None:
  """Persists every compiled program in ``directory``, emptied first.

  A later run of the same shapes and config loads the program instead of compiling it,
  so the SLW run's full-length step and its evaluation cost what the baseline's already
  paid. Emptied so that no number depends on an earlier invocation. JAX reads this
  setting at the process's first compilation.
  """
  shutil.rmtree(directory, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  out = os.path.join(common.OUTPUT_DIR.value, "slw_stability")
  if COMPILATION_CACHE.value:
    use_compilation_cache(os.path.join(out, "compilation_cache"))
  if SWEEP.value:
    return run_sweep(quick, out)
  configs = _pair(quick, 30 if quick else STEPS.value, LR.value, BATCH_SIZE.value)
  rows, curves = {}, {}
  for label, config in configs.items():
    rows[label], curves[label] = _train(label, config, os.path.join(out, label))
  base, slw = rows["baseline"], rows["slw"]
  target = TARGET_VAL_LOSS.value or base["val_loss"]
  for label, row in rows.items():
    row["tokens_to_target"] = tokens_to_target(curves[label], row["initial_val_loss"], target)
  summary = {
      "baseline_spikes": base["spikes"],
      "slw_spikes": slw["spikes"],
      "token_ratio_to_target": base["tokens_to_target"] / slw["tokens_to_target"],
      "baseline_diverged": base["diverged"],
      "slw_diverged": slw["diverged"],
      "baseline_val_loss": base["val_loss"],
      "slw_val_loss": slw["val_loss"],
      "target_val_loss": target,
      "baseline_tokens_to_target": base["tokens_to_target"],
      "slw_tokens_to_target": slw["tokens_to_target"],
      "baseline_compilations": base["compilations"],
      "slw_compilations": slw["compilations"],
      "baseline_compile_share": base["compile_share"],
      "slw_compile_share": slw["compile_share"],
      "compile_fraction": slw["compile_share"],
      "slw_extra_compile_s": slw["compile_s"] - base["compile_s"],
      "batch_size": configs["baseline"].batch_size,
      "peak_lr": LR.value,
      "spike_threshold": SPIKE_THRESHOLD.value,
      "claim": "stable at 8x batch / 4x LR; up to 2.2x fewer tokens to the same loss",
  }
  png = os.path.join(common.OUTPUT_DIR.value, "slw_stability.png")
  plot_runs(curves, png, key="val_loss", x="tokens_seen")
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "slw_stability_train.png"),
            x="tokens_seen")
  header = (
      _header(configs, f"{LR.value:g}") + f" Batch {configs['baseline'].batch_size}. "
      f"Target validation loss {target:.4g}; token_ratio_to_target = baseline tokens / SLW "
      "tokens to reach it; compile_fraction = the SLW run's compile_s / loop_s. Paper: stable "
      "at 8x batch / 4x LR, up to 2.2x fewer tokens. Curves: slw_stability.png (validation) "
      "and slw_stability_train.png (training), against tokens.")
  common.write_results("slw_stability", summary, list(rows.values()),
                       configs["slw"].to_dict(), header)


if __name__ == "__main__":
  common.run_app(main)
