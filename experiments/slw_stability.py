"""Sequence-length warm-up (SLW) at a large batch and a high learning rate.

  python -m experiments.slw_stability [--quick]

Claim (Li et al. 2022, "The Stability-Efficiency Dilemma", arXiv 2108.06084;
DeepSpeed's curriculum tutorial): warming up the sequence length keeps GPT
pretraining stable at an 8x larger batch and 4x larger learning rate, and
reaches the same validation loss with up to 2.2x fewer tokens.

Two runs of the GPT of ``configs/gpt_tiny.py`` on ``--cpu_devices``
data-parallel workers, at batch ``--batch_size`` (64, 4x gpt_tiny's) and peak
LR ``--lr`` (1.2e-2, 4x gpt_tiny's) with a short warm-up, to provoke
instability:

* baseline: full sequences (``seq_len``) for ``--steps`` steps;
* slw: ``data_efficiency.seqlen`` on, ``seqlen_truncate``, ``fixed_linear``
  from 8 tokens to ``seq_len`` over ``--slw_fraction`` of its steps,
  ``difficulty_step`` 8. It gets the baseline's token budget (the tutorial ends
  runs by tokens), so it runs more, shorter steps.

Both count the learning-rate schedule in tokens (``optim.lr_unit="tokens"``):
warm-up is ``--warmup_steps`` full baseline batches of tokens and the cosine
decay spans the same token budget, so LR(tokens) is the same curve in both runs
(under SLW the warm-up covers more, shorter steps, as the tutorial intends).

Measures, from ``metrics.jsonl`` (the training loss is logged every step):

* ``*_spikes``: loss-spike events. Step t is a spike step if its training loss
  is not finite or exceeds (1 + ``--spike_threshold``) x the minimum of the
  training losses logged before it; only steps after the first 10% of the run
  count. A spike event is a maximal run of consecutive spike steps.
* ``*_diverged``: the final validation loss is not finite or is not below the
  untrained model's.
* tokens to reach the target validation loss (``--target_val_loss``, default
  the baseline's final validation loss), linearly interpolated between
  consecutive evaluations (the untrained model's loss at 0 tokens first);
  ``token_ratio_to_target`` = baseline tokens / SLW tokens (> 1: SLW needs
  fewer; NaN if a run never reaches the target).
* compilations and compile time: SLW compiles the train step once per
  sequence length (``seq_len / 8`` programs).
"""

from __future__ import annotations

import math
import os

from absl import app, flags

from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.training import plot_runs

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 2-layer model, seq 32, 30 steps.")
STEPS = flags.DEFINE_integer("steps", 80, "Baseline steps; SLW runs until the same tokens.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch (sequences) of both runs.")
LR = flags.DEFINE_float("lr", 1.2e-2, "Peak learning rate of both runs.")
WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 5,
                                    "LR warm-up, in full baseline batches of tokens.")
GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Global-norm gradient clipping of both runs.")
SLW_FRACTION = flags.DEFINE_float("slw_fraction", 0.4,
                                  "Share of the SLW run's steps over which the length grows.")
SLW_MIN = flags.DEFINE_integer("slw_min", 8, "First sequence length of the warm-up.")
SPIKE_THRESHOLD = flags.DEFINE_float(
    "spike_threshold", 0.2, "A spike: training loss above (1 + this) x the running minimum.")
TARGET_VAL_LOSS = flags.DEFINE_float(
    "target_val_loss", 0.0, "Target validation loss; 0 uses the baseline's final one.")


def _config(quick: bool, steps: int, slw: bool):
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1)
  config.zero.stage = 0
  config.sample_tokens = 0
  config.batch_size = BATCH_SIZE.value
  config.eval_batches = 2
  if quick:
    config.model.update(num_layers=2, d_model=64, d_ff=256)
    config.seq_len = config.model.max_seq_len = 32
  config.steps = steps
  config.log_every = 1
  config.eval_every = 2 if quick else max(1, STEPS.value // 20)
  config.checkpoint_every = steps
  tokens_per_batch = config.batch_size * config.seq_len
  config.optim.update(learning_rate=LR.value, lr_unit="tokens", grad_clip=GRAD_CLIP.value,
                      warmup=WARMUP_STEPS.value * tokens_per_batch)
  if slw:
    config.data_efficiency.seqlen.update(
        enabled=True, mode="seqlen_truncate", schedule_type="fixed_linear",
        min_difficulty=SLW_MIN.value, max_difficulty=config.seq_len, difficulty_step=8,
        total_curriculum_step=max(1, round(SLW_FRACTION.value * steps)))
  return config


def _slw_steps(quick: bool, budget: int, start: int) -> int:
  """The fewest SLW steps (its curriculum spanning ``--slw_fraction`` of them) for ``budget``."""
  steps = start
  while common.run_tokens(_config(quick, steps, slw=True)) < budget:
    steps += 1
  return steps


def spike_steps(records: list[dict], steps: int, threshold: float) -> list[int]:
  """Steps after the first 10% whose loss is non-finite or > (1 + threshold) x the running min."""
  spikes, running_min = [], math.inf
  for r in sorted((r for r in records if "loss" in r), key=lambda r: r["step"]):
    loss = r["loss"]
    late = r["step"] > 0.1 * steps
    if late and (not math.isfinite(loss) or loss > (1 + threshold) * running_min):
      spikes.append(int(r["step"]))
    if math.isfinite(loss):
      running_min = min(running_min, loss)
  return spikes


def spike_events(steps: list[int]) -> int:
  """Maximal runs of consecutive spike steps."""
  return sum(1 for i, s in enumerate(steps) if i == 0 or s != steps[i - 1] + 1)


def tokens_to_target(records: list[dict], initial_val_loss: float, target: float) -> float:
  """Tokens at which validation loss first reaches ``target``, interpolated; NaN if never."""
  points = [(0.0, initial_val_loss)] + [(r["tokens_seen"], r["val_loss"]) for r in records
                                        if "val_loss" in r]
  return common.first_reach(points, target)


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  steps = 30 if quick else STEPS.value
  out = os.path.join(common.OUTPUT_DIR.value, "slw_stability")
  budget = common.run_tokens(_config(quick, steps, slw=False))
  configs = {"baseline": _config(quick, steps, slw=False),
             "slw": _config(quick, _slw_steps(quick, budget, steps), slw=True)}
  runs, curves = {}, {}
  for label, config in configs.items():
    runs[label], curves[label] = common.fresh_run(config, os.path.join(out, label))

  target = TARGET_VAL_LOSS.value or runs["baseline"]["val_loss"]
  rows = []
  for label, summary in runs.items():
    config = configs[label]
    spikes = spike_steps(curves[label], config.steps, SPIKE_THRESHOLD.value)
    val = summary["val_loss"]
    rows.append({
        "run": label, "steps": config.steps, "tokens_seen": summary["tokens_seen"],
        "val_loss": val, "initial_val_loss": summary["initial_val_loss"],
        "final_train_loss": summary["final_loss"],
        "diverged": not math.isfinite(val) or val >= summary["initial_val_loss"],
        "spikes": spike_events(spikes), "spike_steps": len(spikes),
        "skipped_steps": summary["skipped_steps"],
        "tokens_to_target": tokens_to_target(curves[label], summary["initial_val_loss"],
                                             target),
        "compilations": summary["train_step_compilations"],
        "compile_s": summary["compile_s"], "loop_s": summary["loop_s"],
        "compile_share": summary["compile_s"] / summary["loop_s"],
    })
  by = {r["run"]: r for r in rows}
  base, slw = by["baseline"], by["slw"]
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
      f"GPT at batch {configs['baseline'].batch_size} and peak LR {LR.value:g} with a "
      f"{WARMUP_STEPS.value}-batch warm-up, with and without sequence-length warm-up "
      f"({SLW_MIN.value} -> {configs['slw'].seq_len} tokens over {SLW_FRACTION.value:.0%} of "
      "its steps, same token budget, LR schedule in tokens). Spike: training loss > "
      f"(1 + {SPIKE_THRESHOLD.value:g}) x running minimum after the first 10% of steps. "
      f"Target validation loss {target:.4g}; token_ratio_to_target = baseline tokens / SLW "
      "tokens to reach it. Paper: stable at 8x batch / 4x LR, up to 2.2x fewer tokens. "
      "Curves: slw_stability.png (validation) and slw_stability_train.png (training), "
      "against tokens.")
  common.write_results("slw_stability", summary, rows, configs["slw"].to_dict(), header)


if __name__ == "__main__":
  app.run(main)
