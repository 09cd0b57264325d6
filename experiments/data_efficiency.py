"""Composed data efficiency: curriculum sampling + sequence-length curriculum + random-LTD.

  python -m experiments.data_efficiency [--quick]

Claim (Li et al. 2022, DeepSpeed Data Efficiency, arXiv 2212.03597; DeepSpeed
blog 2022-12-12): composing a data-sampling curriculum with random-LTD reaches
the baseline's quality with up to 2x less data and 2x less time (GPT-3 1.3B).

Runs of the GPT of ``configs/gpt_tiny.py`` (4 layers, S = 128) on
``--cpu_devices`` data-parallel workers, all on the baseline's token budget:

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

Controls, to attribute the composed run's saving (``--controls``):

* ``same_steps``: the baseline with the composed run's number of steps, every
  batch cut to one fixed length L (the budget over those steps, a constant
  ``fixed_discrete`` seqlen schedule): more, shorter optimizer steps and no
  curriculum;
* ``curriculum``, ``seqlen``, ``random_ltd``: each piece of the composed run
  alone, with its settings there (``seqlen`` fills the budget with more steps).

All warm up over the tokens (layer-tokens) of the same number of full steps.

Target: the baseline's final validation loss. Tokens and time to reach it are
linearly interpolated between consecutive evaluations (the untrained model's
loss at 0 first), read from ``metrics.jsonl`` (logged every step):

* ``data_saving`` = 1 − composed tokens to target / baseline tokens to target
  (0.5 is the paper's 2x; NaN if the composed run never reaches the target);
  ``data_saving_<run>`` the same for each control, and the table's
  ``share_of_composed`` = data_saving_<run> / data_saving: how much of the
  composed saving that part alone gives (the parts need not add up);
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
from absl import flags

from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.errors import FlagError
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

PARTS = ("curriculum", "seqlen", "random_ltd")
CONTROLS = ("same_steps", *PARTS)
CONTROLS_FLAG = flags.DEFINE_list("controls", list(CONTROLS), "Control runs besides the "
                                  f"baseline and the composed run; any of {', '.join(CONTROLS)}.")


def _config(quick: bool, steps: int, parts: tuple[str, ...], warmup_steps: int,
            fixed_length: int = 0):
  """The baseline with the composed run's ``parts`` switched on; with ``fixed_length``, every
  batch cut to that many tokens."""
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
  de = config.data_efficiency
  span = max(1, round(CURRICULUM_FRACTION.value * steps))
  if "curriculum" in parts:
    de.curriculum.update(enabled=True, metric="vocab_rarity", difficulty_type="percentile",
                         schedule_type="fixed_root", root_degree=2,
                         min_difficulty=MIN_PERCENTILE.value, max_difficulty=100,
                         difficulty_step=1, total_curriculum_step=span)
  if "seqlen" in parts:
    de.seqlen.update(enabled=True, mode="seqlen_truncate", schedule_type="fixed_linear",
                     min_difficulty=SEQLEN_MIN.value, max_difficulty=s,
                     difficulty_step=SEQLEN_STEP.value, total_curriculum_step=span)
  elif fixed_length:
    de.seqlen.update(enabled=True, mode="seqlen_truncate", schedule_type="fixed_discrete",
                     min_difficulty=fixed_length, max_difficulty=fixed_length,
                     difficulties=[fixed_length], max_steps=[])
  if "random_ltd" in parts:
    de.random_ltd.update(enabled=True, min_value=s // 4, max_value=s, seq_per_step=16,
                         require_steps=max(1, round(LTD_FRACTION.value * steps)))
    config.optim.update(lr_unit="layer_tokens", warmup=config.optim.warmup * layers)
  return config


def budget_config(quick: bool, parts: tuple[str, ...], warmup: int, budget: float, steps: int):
  """``_config`` with the fewest steps from ``steps`` up whose tokens reach ``budget``."""
  while common.run_tokens(_config(quick, steps, parts, warmup)) < budget:
    steps += 1
  return _config(quick, steps, parts, warmup)


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
  unknown = set(CONTROLS_FLAG.value) - set(CONTROLS)
  if unknown:
    raise FlagError("controls", f"unknown {', '.join(sorted(unknown))}; allowed: "
                    f"{', '.join(CONTROLS)}")
  common.setup_devices()
  quick = QUICK.value
  steps = 20 if quick else STEPS.value
  warmup = max(1, steps // 10)
  baseline = _config(quick, steps, (), warmup)
  budget = BUDGET_FRACTION.value * common.run_tokens(baseline)
  first = max(1, round(BUDGET_FRACTION.value * steps))
  composed = budget_config(quick, PARTS, warmup, budget, first)
  configs = {"baseline": baseline}
  for name in CONTROLS:
    if name not in CONTROLS_FLAG.value:
      continue
    if name == "same_steps":  # the composed run's steps, one length filling the budget
      length = math.ceil(budget / (composed.steps * baseline.batch_size))
      configs[name] = _config(quick, composed.steps, (), warmup, fixed_length=length)
    else:
      configs[name] = budget_config(quick, (name,), warmup, budget, first)
  configs["composed"] = composed

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
  rows = {row["run"]: row for row in rows}
  base, comp = rows["baseline"], rows["composed"]
  saving = {label: 1 - row["tokens_to_target"] / base["tokens_to_target"]
            for label, row in rows.items()}
  for label, row in rows.items():
    row["data_saving"] = saving[label]
    row["share_of_composed"] = saving[label] / saving["composed"] if saving["composed"] else (
        math.nan)
  reached = math.isfinite(comp["tokens_to_target"])
  summary = {
      "data_saving": saving["composed"],
      **{f"data_saving_{label}": saving[label] for label in configs
         if label not in ("baseline", "composed")},
      "time_saving": 1 - comp["compute_s_to_target"] / base["compute_s_to_target"],
      "time_saving_wall": 1 - comp["wall_s_to_target"] / base["wall_s_to_target"],
      "composed_reached_target": reached,
      "target_val_loss": target,
      "composed_val_loss": comp["val_loss"],
      "val_loss_rel_gap": comp["val_loss"] / base["val_loss"] - 1,
      "composed_token_budget": comp["tokens_seen"] / base["tokens_seen"],
      "composed_compute_s_ratio": comp["compute_s"] / base["compute_s"],
      "composed_compilations": comp["compilations"],
      "composed_steps": comp["steps"],
      "claim": "up to 2x less data and 2x less time (data_saving, time_saving 0.5)",
  }
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "data_efficiency.png"),
            key="val_loss", x="tokens_seen")
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "data_efficiency_time.png"),
            key="val_loss", x="compute_s")
  de = configs["composed"].data_efficiency
  fixed_length = (configs["same_steps"].data_efficiency.seqlen.difficulties[0]
                  if "same_steps" in configs else "-")
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
      "Controls, same token budget: same_steps = the baseline in the composed run's "
      f"{comp['steps']} steps, every batch cut to {fixed_length} tokens (more, shorter "
      "steps, no curriculum); curriculum, seqlen, random_ltd = each "
      "piece alone. data_saving per run; share_of_composed = its data_saving / the composed "
      "run's (the parts need not add up). "
      "Curves: data_efficiency.png (vs tokens), data_efficiency_time.png (vs compute s).")
  common.write_results("data_efficiency", summary, list(rows.values()),
                       configs["composed"].to_dict(), header)


if __name__ == "__main__":
  common.run_app(main)
