"""Convergence of 1-bit Adam, 0/1 Adam and 1-bit LAMB against their uncompressed baselines.

  python -m experiments.onebit_convergence [--quick] [--runs=...] [--batch_size=...]

Trains the GPT of ``configs/gpt_tiny.py`` on the default corpus with
``--cpu_devices`` data-parallel workers (8: data=8, no other parallelism),
the same steps, batches and learning-rate schedule for every optimizer:

* Adam vs 1-bit Adam (variance frozen and compression from
  ``--warmup_fraction`` of the run) vs 0/1 Adam (variance frozen at the same
  point; local-step interval doubling every ``--local_step_scaler`` steps up
  to 16). The Adam baseline is 1-bit Adam's warm-up rule (Adam without bias
  correction, as DeepSpeed's) for the whole run, so the gap isolates
  compression; ``--runs=adamw`` adds optax's AdamW;
* LAMB vs 1-bit LAMB. The LAMB baseline is DeepSpeed's LAMB — 1-bit LAMB's
  warm-up rule (clipped trust ratio, no bias correction) for the whole run —
  so the gap isolates compression; ``--runs=lamb_optax`` adds optax's LAMB.

The ablations of the README change one flag each: ``--cpu_devices=1`` (no
compression: one worker's 1-bit step is exact, so what is left is the frozen
variance), ``--warmup_fraction``, ``--batch_size`` (sequences per worker),
``--local_step_scaler``, ``--var_update_scaler``.

Paper claims (Tang et al. 2021; Li et al. 2021; Lu et al. 2022): the same
convergence as the uncompressed optimizer. Target here: final validation loss
within 2% (``*_rel_gap`` = compressed / baseline − 1).
"""

from __future__ import annotations

import collections
import math
import os

import jax
from absl import flags

from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.errors import FlagError
from jaxspeed.training import plot_runs

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 2-layer model, seq 32, 12 steps, "
                          "Adam, 1-bit Adam and 0/1 Adam only.")
STEPS = flags.DEFINE_integer("steps", 300, "Training steps of every run.")
WARMUP_FRACTION = flags.DEFINE_float(
    "warmup_fraction", 0.5, "Share of steps before 1-bit compression starts (the variance "
    "freezes). At 0.15 of 300 steps the variance freezes while the gradients still shrink, "
    "which alone costs 1-bit Adam 7.9% (docs/results/onebit_convergence_1worker.md).")
LOCAL_STEP_SCALER = flags.DEFINE_integer("local_step_scaler", 30,
                                         "0/1 Adam: steps between local-interval doublings.")
VAR_UPDATE_SCALER = flags.DEFINE_integer(
    "var_update_scaler", 16, "0/1 Adam: variance steps between doublings of their interval "
    "(DeepSpeed's default 16); at least the number of steps makes phase 1 exact Adam.")
ADAM_LR = flags.DEFINE_float("adam_lr", 3e-3, "Peak learning rate of the Adam family.")
LAMB_LR = flags.DEFINE_float("lamb_lr", 2e-2, "Peak learning rate of the LAMB family.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Global batch (sequences), split over "
                                  "the workers.")
RUNS = flags.DEFINE_list("runs", [], "Only these runs (labels of the table), e.g. "
                         "adam,onebit_adam for an ablation; empty: all.")
GRAD_CLIP = flags.DEFINE_float(
    "grad_clip", 0.0, "Global-norm clipping of every run; off by default, as in the committed "
    "report. Compressed steps clip by a CountSketch estimate of the averaged gradient's norm "
    "(jaxspeed.comm.norm_sketch).")


def _config(quick: bool, steps: int):
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1)
  config.zero.stage = 0
  config.steps = steps
  config.sample_tokens = 0
  config.log_every = max(1, steps // 30)
  config.eval_every = max(1, steps // 6)
  config.checkpoint_every = steps
  config.optim.grad_clip = GRAD_CLIP.value
  config.batch_size = BATCH_SIZE.value
  if quick:
    config.model.update(num_layers=2, d_model=64, d_ff=256)
    config.batch_size, config.seq_len = 16, 32
    config.model.max_seq_len = 32
    config.eval_batches = 2
  return config


def _runs(steps: int, quick: bool) -> dict[str, dict]:
  """The runs by label: the three pairs by default, ``--runs`` picks any (the optax
  references ``adamw`` and ``lamb_optax`` too); ``quick`` runs the Adam family only."""
  freeze = max(1, round(WARMUP_FRACTION.value * steps))
  adam = {"learning_rate": ADAM_LR.value}
  lamb = {"learning_rate": LAMB_LR.value}
  runs = {
      "adamw": {"name": "adamw", **adam},
      "adam": {"name": "onebit_adam", "freeze_step": steps + 1, **adam},
      "onebit_adam": {"name": "onebit_adam", "freeze_step": freeze, **adam},
      "zero_one_adam": {"name": "zero_one_adam", "var_freeze_step": freeze,
                        "local_step_scaler": LOCAL_STEP_SCALER.value,
                        "var_update_scaler": VAR_UPDATE_SCALER.value, **adam},
      "lamb_optax": {"name": "lamb", **lamb},
      "lamb": {"name": "onebit_lamb", "freeze_step": steps + 1, **lamb},
      "onebit_lamb": {"name": "onebit_lamb", "freeze_step": freeze, **lamb},
  }
  if unknown := set(RUNS.value) - set(runs):
    raise FlagError("runs", f"unknown {sorted(unknown)}; allowed: {', '.join(runs)}")
  if RUNS.value:
    return {k: runs[k] for k in RUNS.value}
  if quick:  # the Adam family; tests/test_onebit.py trains 1-bit LAMB too
    return {k: runs[k] for k in ("adam", "onebit_adam", "zero_one_adam")}
  # optax's AdamW and LAMB, references for the baselines, on request (--runs).
  return {k: v for k, v in runs.items() if k not in ("adamw", "lamb_optax")}


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  steps = 12 if quick else STEPS.value
  out = os.path.join(common.OUTPUT_DIR.value, "onebit_convergence")
  rows, curves = [], {}
  for label, optim in _runs(steps, quick).items():
    config = _config(quick, steps)
    config.optim.update(optim)
    summary, curves[label] = common.fresh_run(config, os.path.join(out, label))
    rows.append({"optimizer": label, "config_name": optim["name"],
                 "final_train_loss": summary["final_loss"], "val_loss": summary["val_loss"],
                 "initial_val_loss": summary["initial_val_loss"],
                 "tokens_per_s": summary["tokens_per_s"],
                 "skipped_steps": summary["skipped_steps"]})
  val = collections.defaultdict(lambda: math.nan, {r["optimizer"]: r["val_loss"] for r in rows})
  summary = {
      "onebit_adam_rel_gap": val["onebit_adam"] / val["adam"] - 1,
      "zero_one_adam_rel_gap": val["zero_one_adam"] / val["adam"] - 1,
      "onebit_adam_rel_gap_vs_adamw": val["onebit_adam"] / val["adamw"] - 1,
      "onebit_lamb_rel_gap": val["onebit_lamb"] / val["lamb"] - 1,
      "onebit_lamb_rel_gap_vs_optax_lamb": val["onebit_lamb"] / val["lamb_optax"] - 1,
      "steps": steps,
      "workers": config.parallel.data if config.parallel.data > 0 else "all",
      "target": "|gap| <= 0.02",
  }
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "onebit_convergence.png"),
            key="val_loss")
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "onebit_convergence_train.png"))
  header = ("Final validation loss (nats/token) of each optimizer, same data, steps and "
            f"schedule on {jax.device_count()} data-parallel workers, global batch "
            f"{config.batch_size}, compression from step "
            f"{max(1, round(WARMUP_FRACTION.value * steps))}. "
            "Papers: 1-bit Adam, 0/1 Adam and 1-bit LAMB "
            "converge like their uncompressed counterparts. Curves: onebit_convergence.png "
            "(validation) and onebit_convergence_train.png.")
  common.write_results("onebit_convergence", summary, rows, _config(quick, steps).to_dict(),
                       header)


if __name__ == "__main__":
  common.run_app(main)
