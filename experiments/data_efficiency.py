"""Composed data efficiency: curriculum sampling + sequence-length curriculum + random-LTD.

  python -m experiments.data_efficiency [--quick]

Claim (Li et al. 2022, DeepSpeed Data Efficiency, arXiv 2212.03597; DeepSpeed
blog 2022-12-12): composing a data-sampling curriculum with random-LTD reaches
the baseline's quality with up to 2x less data and 2x less time (GPT-3 1.3B).

Two runs of the GPT of ``configs/gpt_tiny.py`` (4 layers, S = 128) on
``--cpu_devices`` data-parallel workers:

* baseline: random windows of S tokens, ``--steps`` steps, LR in tokens;
* composed, in one run, the published recipe's pieces (reference §4):
  - ``data_efficiency.curriculum``: vocab-rarity (Σ −log p(token)) percentile
    curriculum, ``fixed_root`` with root 2 from ``--min_percentile`` to 100
    over 60% of the steps;
  - ``data_efficiency.seqlen``: ``seqlen_truncate``, ``fixed_linear`` from
    ``--seqlen_min`` to S over 60% of the steps, in multiples of
    ``--seqlen_step`` (16, not 8, to halve the compiled programs: one per
    (length, kept length) pair);
  - ``data_efficiency.random_ltd``: kept length S/4 -> S over 70% of the steps,
    multiples of 16; LR schedule in layer-tokens (``lr_unit="layer_tokens"``).
  It gets ``--budget_fraction`` of the baseline's tokens (1: the same data; the
  paper instead reruns at half the data), so it runs more, shorter steps.

Both warm up over the tokens (layer-tokens) of the same number of full steps.

Target: the baseline's final validation loss. Tokens and time to reach it are
linearly interpolated between consecutive evaluations (the untrained model's
loss at 0 first), read from ``metrics.jsonl`` (logged every step):

* ``data_saving`` = 1 − composed tokens to target / baseline tokens to target
  (0.5 is the paper's 2x; NaN if the composed run never reaches the target);
* ``time_saving`` = 1 − composed time / baseline time to target, in compute
  time: step wall times with every step that compiles, or that follows an
  evaluation, replaced by the median clean time of its kind of step (same
  sequence length and kept length), so compilation and evaluation are left
  out; ``time_saving_wall`` uses the raw ``elapsed_s`` (both included).

On this tiny model and corpus the composed run may not reach the target; the
summary says so (``composed_reached_target``) rather than extrapolating.
"""

from __future__ import annotations

import collections
import math
import os

import numpy as np
from absl import app, flags

from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.training import plot_runs
from jaxspeed.training.trainer import layer_dropping

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 3-layer model, seq 32, 20 steps.")
STEPS = flags.DEFINE_integer("steps", 300, "Baseline steps; the composed run fills its budget.")
BUDGET_FRACTION = flags.DEFINE_float(
    "budget_fraction", 1.0, "Composed run's tokens as a share of the baseline's.")
MIN_PERCENTILE = flags.DEFINE_integer(
    "min_percentile", 5, "Vocab-rarity curriculum: the easiest percentile drawn first.")
SEQLEN_MIN = flags.DEFINE_integer("seqlen_min", 16, "Sequence-length curriculum: first length.")
SEQLEN_STEP = flags.DEFINE_integer("seqlen_step", 16, "Sequence lengths are multiples of this.")
CURRICULUM_FRACTION = flags.DEFINE_float(
    "curriculum_fraction", 0.6, "Share of the composed run's steps the two curricula span.")
LTD_FRACTION = flags.DEFINE_float(
    "ltd_fraction", 0.7, "Share of the composed run's steps over which the kept length reaches S.")


def _config(quick: bool, steps: int, composed: bool, warmup_steps: int):
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1)
  config.zero.stage = 0
  config.sample_tokens = 0
  config.steps = steps
  config.log_every = 1  # per-step times and the loss curve
  config.eval_every = 4 if quick else max(1, STEPS.value // 15)
  config.checkpoint_every = steps
  config.eval_batches = 4
  if quick:
    config.model.update(num_layers=3, d_model=64, d_ff=256)
    config.seq_len = config.model.max_seq_len = 32
    config.eval_batches = 2
  s, layers = config.seq_len, config.model.num_layers
  config.optim.update(lr_unit="tokens", warmup=warmup_steps * config.batch_size * s)
  if composed:
    de = config.data_efficiency
    span = max(1, round(CURRICULUM_FRACTION.value * steps))
    de.curriculum.update(enabled=True, metric="vocab_rarity", difficulty_type="percentile",
                         schedule_type="fixed_root", root_degree=2,
                         min_difficulty=MIN_PERCENTILE.value, max_difficulty=100,
                         difficulty_step=1, total_curriculum_step=span)
    de.seqlen.update(enabled=True, mode="seqlen_truncate", schedule_type="fixed_linear",
                     min_difficulty=SEQLEN_MIN.value, max_difficulty=s,
                     difficulty_step=SEQLEN_STEP.value, total_curriculum_step=span)
    de.random_ltd.update(enabled=True, min_value=s // 4, max_value=s, seq_per_step=16,
                         require_steps=max(1, round(LTD_FRACTION.value * steps)))
    config.optim.update(lr_unit="layer_tokens", warmup=config.optim.warmup * layers)
  return config


def compute_seconds(records: list[dict], config) -> dict[int, float]:
  """Step -> cumulative compute seconds: compiling and post-evaluation steps at their kind's median.

  A kind is (sequence length, random-LTD kept length): the train step compiles
  once per kind, on its first step.
  """
  by_step = {int(r["step"]): r for r in records}
  kept_at = layer_dropping(config).kept_length_at
  kinds, durations, first = {}, {}, {}
  previous = 0.0
  for t in sorted(by_step):
    kinds[t] = (int(by_step[t]["seq_len"]), kept_at(t - 1))
    first.setdefault(kinds[t], t)
    durations[t] = by_step[t]["elapsed_s"] - previous
    previous = by_step[t]["elapsed_s"]
  clean = {t for t in by_step if first[kinds[t]] != t and t - 1 in by_step
           and (t - 1) % config.eval_every != 0}
  times = collections.defaultdict(list)
  for t in clean:
    times[kinds[t]].append(durations[t])
  median = {k: float(np.median(v)) for k, v in times.items()}
  overall = float(np.median([durations[t] for t in clean])) if clean else math.nan
  total, out = 0.0, {}
  for t in sorted(by_step):
    total += durations[t] if t in clean else median.get(kinds[t], overall)
    out[t] = total
  return out


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  steps = 20 if quick else STEPS.value
  warmup = max(1, steps // 10)
  baseline = _config(quick, steps, False, warmup)
  budget = BUDGET_FRACTION.value * common.run_tokens(baseline)
  composed_steps = max(1, round(BUDGET_FRACTION.value * steps))
  while common.run_tokens(_config(quick, composed_steps, True, warmup)) < budget:
    composed_steps += 1
  configs = {"baseline": baseline, "composed": _config(quick, composed_steps, True, warmup)}

  out = os.path.join(common.OUTPUT_DIR.value, "data_efficiency")
  runs, curves = {}, {}
  for label, config in configs.items():
    runs[label], curves[label] = common.fresh_run(config, os.path.join(out, label))
    compute = compute_seconds(curves[label], config)
    for record in curves[label]:
      record["compute_s"] = compute[int(record["step"])]

  target = runs["baseline"]["val_loss"]
  rows = []
  for label, summary in runs.items():
    evals = [r for r in curves[label] if "val_loss" in r]
    initial = summary["initial_val_loss"]
    at = lambda key, evals=evals, initial=initial: common.first_reach(
        [(0.0, initial)] + [(r[key], r["val_loss"]) for r in evals], target)
    rows.append({
        "run": label, "steps": configs[label].steps, "tokens_seen": summary["tokens_seen"],
        "val_loss": summary["val_loss"], "best_val_loss": min(r["val_loss"] for r in evals),
        "tokens_to_target": at("tokens_seen"), "compute_s_to_target": at("compute_s"),
        "wall_s_to_target": at("elapsed_s"), "compute_s": curves[label][-1]["compute_s"],
        "loop_s": summary["loop_s"], "compile_s": summary["compile_s"],
        "compilations": summary["train_step_compilations"],
    })
  base, comp = rows
  reached = math.isfinite(comp["tokens_to_target"])
  summary = {
      "data_saving": 1 - comp["tokens_to_target"] / base["tokens_to_target"],
      "time_saving": 1 - comp["compute_s_to_target"] / base["compute_s_to_target"],
      "time_saving_wall": 1 - comp["wall_s_to_target"] / base["wall_s_to_target"],
      "composed_reached_target": reached,
      "target_val_loss": target,
      "composed_val_loss": comp["val_loss"],
      "val_loss_rel_gap": comp["val_loss"] / base["val_loss"] - 1,
      "composed_token_budget": comp["tokens_seen"] / base["tokens_seen"],
      "composed_compute_s_ratio": comp["compute_s"] / base["compute_s"],
      "composed_compilations": comp["compilations"],
      "claim": "up to 2x less data and 2x less time (data_saving, time_saving 0.5)",
  }
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "data_efficiency.png"),
            key="val_loss", x="tokens_seen")
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "data_efficiency_time.png"),
            key="val_loss", x="compute_s")
  de = configs["composed"].data_efficiency
  header = (
      "Baseline GPT vs one run composing a vocab-rarity percentile curriculum "
      f"({de.curriculum.min_difficulty} -> 100, fixed_root 2), a sequence-length curriculum "
      f"({de.seqlen.min_difficulty} -> {configs['composed'].seq_len}, step "
      f"{de.seqlen.difficulty_step}) and random-LTD ({de.random_ltd.min_value} -> "
      f"{configs['composed'].seq_len}, layer-token LR), with {BUDGET_FRACTION.value:g}x the "
      f"baseline's tokens. Target: the baseline's final validation loss {target:.4g}. "
      "data_saving = 1 − composed/baseline tokens to target; time_saving the same in compute "
      "seconds (compilation and evaluation left out), time_saving_wall in raw seconds. NaN: "
      "the composed run never reached the target. Paper: up to 2x less data and time. "
      "Curves: data_efficiency.png (vs tokens), data_efficiency_time.png (vs compute s).")
  common.write_results("data_efficiency", summary, rows, configs["composed"].to_dict(), header)


if __name__ == "__main__":
  app.run(main)
