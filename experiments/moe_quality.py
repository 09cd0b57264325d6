"""MoE quality: dense vs MoE vs PR-MoE vs Residual-MoE vs MoS student, validation loss vs tokens.

  python -m experiments.moe_quality [--quick]

Claims (DeepSpeed-MoE, Rajbhandari et al. 2022, arXiv 2201.05596, §4 and §5): an
MoE model reaches a lower validation loss than the dense model with the same
active compute per token; PR-MoE (pyramid + residual) matches standard MoE's
quality with fewer parameters; MoS (a PR-MoE student with 12.5% fewer layers,
distilled from the PR-MoE teacher with KD stopped late: staged KD) recovers
the teacher's quality.

Runs, all the GPT of ``configs/gpt_tiny.py`` at ``--layers`` layers of width
``--d_model`` on the default corpus, ``--steps`` steps each (the same batches,
so the same tokens), evaluated ``--evals`` times along the way:

* dense: every layer an MLP;
* moe: every 2nd layer E = 8 experts, top-1 (DeepSpeed's MoE-8);
* prmoe: pyramid (4 experts in the first MoE layers, 8 in the last) plus a
  residual MLP beside each MoE (``moe.layer_num_experts``, ``moe.use_residual``);
* residual: 8 experts, top-1, plus the residual MLP (Residual-MoE);
* mos: a PR-MoE student with one layer fewer, distilled from the prmoe run on
  the same tokens (``kd``: T = 1, α = β = 1, KD for the first
  ``--kd_stop_fraction`` of the steps: staged KD); ``--teacher_steps`` trains
  the teacher longer in its own ``teacher`` run instead (an ablation: the
  teacher then saw more data than the student);
* student: the same student without distillation.

The MoE layers are dropless (``--capacity_factor=0``, the default): with
capacity C = ⌈S/E · cf⌉ per 64-token sequence, cf = 1 drops 20-30% of the
token-expert assignments in these runs (half early on), and a dropped token skips its
MoE layer (PR-MoE and Residual-MoE fall back to their residual MLP), which
hides the architectures' differences; ``--capacity_factor=1`` measures that
(``dropped_fraction`` in the table).

``--runs`` trains a subset (every variant's parameters are still counted);
``--residual_mix=learned`` mixes the residual MLP and the MoE by DeepSpeed's
learned per-token softmax instead of the paper's sum. ``--quick`` (a smoke
test) trains only prmoe and its MoS student, 2 steps of 2 layers (both MoE) of
width 32. The report and the plot are rewritten after every run.

Runs on one device unless ``--cpu_devices`` is given. Parameters are counted
from the model's parameter shapes; active parameters per token count only
top-k of the E experts of each MoE layer (``jaxspeed.moe.param_counts``).
Validation loss is the trainer's evaluation (cross-entropy only, no aux term)
on ``eval_batches`` held-out batches, the same for every run. Curves:
``moe_quality.png``, validation loss vs tokens.
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import flags

from experiments import common
from jaxspeed.errors import FlagError, RunError
from jaxspeed.models import GPT, ModelConfig
from jaxspeed.moe import MoeConfig, param_counts
from jaxspeed.training import plot_runs

QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke run: prmoe and mos only, 2 layers (both MoE), 2 steps, width 32.")
STEPS = flags.DEFINE_integer("steps", 800, "Training steps of every run.", lower_bound=1)
LAYERS = flags.DEFINE_integer("layers", 6, "Layers of the dense, MoE and teacher models.",
                              lower_bound=2)
D_MODEL = flags.DEFINE_integer("d_model", 32, "Model width (d_ff = 4 x d_model).",
                               lower_bound=8)
EVALS = flags.DEFINE_integer("evals", 10, "Evaluations along each run (the curves' points).",
                             lower_bound=1)
CAPACITY = flags.DEFINE_float(
    "capacity_factor", 0.0, "Expert capacity factor in training and evaluation; 0: dropless.",
    lower_bound=0.0)
KD_STOP = flags.DEFINE_float("kd_stop_fraction", 0.75, "Staged KD: share of steps distilled.",
                             lower_bound=0.0, upper_bound=1.0)
TEACHER_STEPS = flags.DEFINE_integer(
    "teacher_steps", 0, "Train the MoS teacher (the prmoe model) for this many steps in its own "
    "run; 0: distill from the prmoe run itself (the same tokens as the student).",
    lower_bound=0)
RESIDUAL_MIX = flags.DEFINE_enum(
    "residual_mix", "sum", ["sum", "learned"], "moe.residual_mix of the residual variants: "
    "MLP + MoE (the paper) or DeepSpeed's learned per-token mix.")
RUNS = flags.DEFINE_list(
    "runs", [], "Variants to train, of dense, moe, prmoe, teacher, mos, student, residual "
    "(mos needs its teacher); default: all (--quick: prmoe, mos). Every variant's parameters "
    "are counted.")
SEED = flags.DEFINE_integer("seed", 0, "config.seed of every run (initialization and data "
                            "order): a second seed sizes the run-to-run noise.")
NUM_EXPERTS = 8
QUICK_RUNS = ("prmoe", "mos")


def _base(quick: bool, steps: int, layers: int, d_model: int, evals: int,
          capacity_factor: float):
  config = common.small_moe_gpt(quick, steps, layers)
  config.moe.expert_interval = interval(quick)
  if capacity_factor:
    config.moe.update(capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor)
  else:
    config.moe.drop_tokens = False
  if not quick:
    config.model.update(d_model=d_model, d_ff=4 * d_model, num_heads=max(1, d_model // 16))
    config.eval_batches = 8
  config.eval_every = max(1, steps // evals)
  config.log_every = config.eval_every
  return config


def _pyramid(moe_layers: int) -> tuple[int, ...]:
  """PR-MoE: half the experts in the first MoE layer(s), all of them in the deeper ones."""
  half = max(1, moe_layers // 2)
  return tuple(NUM_EXPERTS // 2 if i < moe_layers - half else NUM_EXPERTS
               for i in range(moe_layers))


def interval(quick: bool) -> int:
  """Every 2nd layer is an MoE layer (DeepSpeed-MoE's models); in the quick run every layer, so
  that its 2 layers have the 2 MoE layers a pyramid needs and no dense ones to compile."""
  return 1 if quick else 2


def student_layers(layers: int) -> int:
  """The MoS student's depth: one layer fewer (the paper: 21 of 24, 12.5% fewer)."""
  return layers - 1


def configs(quick: bool, steps: int, layers: int, teacher_dir: str, kd_stop: float,
            teacher_steps: int = 0, d_model: int = 32, evals: int = 10,
            capacity_factor: float = 0.0, residual_mix: str = "sum", seed: int = 0) -> dict:
  """Every variant's config, in run order; ``teacher_dir`` is the workdir of the prmoe run,
  or with ``teacher_steps`` of the extra ``teacher`` run (prmoe trained that long)."""
  def base(n: int, depth: int):
    config = _base(quick, n, depth, d_model, evals, capacity_factor)
    config.moe.residual_mix = residual_mix
    config.seed = seed
    return config

  moe_layers = layers // interval(quick)
  runs = {"dense": base(steps, layers), "moe": base(steps, layers)}
  runs["moe"].moe.num_experts = NUM_EXPERTS
  runs["prmoe"] = base(steps, layers)
  runs["prmoe"].moe.update(layer_num_experts=_pyramid(moe_layers), use_residual=True)
  if teacher_steps:
    runs["teacher"] = base(teacher_steps, layers)
    runs["teacher"].moe.update(layer_num_experts=_pyramid(moe_layers), use_residual=True)
  depth = student_layers(layers)
  for name in ("mos", "student"):
    runs[name] = base(steps, depth)
    runs[name].moe.update(layer_num_experts=_pyramid(depth // interval(quick)), use_residual=True)
  runs["mos"].kd.update(enabled=True, teacher_workdir=teacher_dir, num_layers_teacher=layers,
                        num_experts_teacher=_pyramid(moe_layers),
                        stop_step=max(1, round(kd_stop * steps)))
  # Last: the ablation of PR-MoE's pyramid (the claims need the runs above first).
  runs["residual"] = base(steps, layers)
  runs["residual"].moe.update(num_experts=NUM_EXPERTS, use_residual=True)
  return runs


def counts(config) -> dict[str, int]:
  """``param_counts`` of the config's GPT, from its parameters' shapes (nothing runs)."""
  model = GPT(ModelConfig.from_config(config.model, MoeConfig.from_config(config.moe)))
  tokens = jax.ShapeDtypeStruct((1, config.seq_len), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  return param_counts(nn.meta.unbox(params), config.moe.top_k)


def _curve(summary: dict, records: list[dict]) -> list[dict]:
  """The run's evaluations as (tokens_seen, val_loss) records, from step 0's."""
  return ([{"tokens_seen": 0, "val_loss": summary["initial_val_loss"]}]
          + [r for r in records if "val_loss" in r])


def plot(curves: dict[str, list[dict]], path: str) -> None:
  """Validation loss vs tokens, one curve per run, from its second evaluation on: the first
  ones (5.5 untrained, then about 3.2) would flatten the gaps between the variants."""
  plot_runs({name: curve[2:] or curve for name, curve in curves.items()}, path,
            key="val_loss", x="tokens_seen")


def _dropped(records: list[dict]) -> float:
  """Mean share of token-expert assignments dropped over the logged training steps."""
  drops = [r["moe_dropped_fraction"] for r in records if "moe_dropped_fraction" in r]
  return sum(drops) / len(drops) if drops else float("nan")


def summarize(loss: dict[str, float], sizes: dict[str, dict[str, int]], teacher: str,
              curves: dict[str, list[dict]]) -> dict[str, float]:
  """The claims' numbers from the finished runs' final validation losses, curves and every
  variant's parameter counts; NaN where a run is missing."""
  nan = float("nan")
  get = lambda name: loss.get(name, nan)
  summary = {f"{name}_val_loss": value for name, value in loss.items()}
  for name, size in sizes.items():
    summary[f"{name}_params"] = size["params"]
    summary[f"{name}_active_params"] = size["active_params"]
  summary["moe_gain_over_dense"] = get("dense") - get("moe")
  # PR-MoE val loss / standard MoE val loss - 1; the paper: ~0 with fewer parameters.
  summary["prmoe_vs_moe_gap"] = get("prmoe") / get("moe") - 1
  summary["residual_vs_moe_gap"] = get("residual") / get("moe") - 1
  summary["prmoe_param_ratio"] = sizes["prmoe"]["params"] / sizes["moe"]["params"]
  summary["mos_param_ratio"] = sizes["mos"]["params"] / sizes["moe"]["params"]
  # KD pulls the student toward the teacher: it can only help if the teacher is better.
  summary["teacher_gain_over_student"] = get("student") - get(teacher)
  summary["mos_gain_over_student"] = get("student") - get("mos")
  # The paper: MoS recovers the teacher's quality (gap ~0) with 12.5% fewer layers.
  summary["mos_vs_teacher_gap"] = get("mos") / get(teacher) - 1
  if "dense" in curves and "moe" in curves:
    # Tokens MoE needs to reach dense's final loss, over dense's (the paper: 5x less cost).
    reach = common.first_reach([(r["tokens_seen"], r["val_loss"]) for r in curves["moe"]],
                               loss["dense"])
    summary["moe_tokens_to_dense_loss_ratio"] = reach / curves["dense"][-1]["tokens_seen"]
  return summary


def main(argv):
  del argv
  # One device unless --cpu_devices is given: quality needs no parallelism, and with 8
  # virtual devices on a loaded 2-core host XLA:CPU's in-process all-reduce rendezvous
  # can exceed its 40 s termination timeout and abort the run.
  common.setup_devices(None if flags.FLAGS["cpu_devices"].present else 1)
  quick = QUICK.value
  steps = 2 if quick else STEPS.value
  layers = 2 if quick else LAYERS.value
  evals = 1 if quick else min(EVALS.value, steps)
  if student_layers(layers) // interval(quick) < 1:
    raise FlagError("layers", f"the MoS student ({student_layers(layers)} layers) needs an MoE "
                    f"layer: use --layers >= 3, got {layers}")
  workdir = os.path.join(common.OUTPUT_DIR.value, "moe_quality_runs")
  teacher = "teacher" if TEACHER_STEPS.value else "prmoe"
  # The quick run distills every step: staged KD's switch would compile a second step.
  runs = configs(quick, steps, layers, os.path.join(workdir, teacher),
                 1.0 if quick else KD_STOP.value,
                 TEACHER_STEPS.value, D_MODEL.value, evals, CAPACITY.value, RESIDUAL_MIX.value,
                 SEED.value)
  selected = RUNS.value or (QUICK_RUNS if quick else list(runs))
  unknown = [name for name in selected if name not in runs]
  if unknown:
    raise FlagError("runs", f"unknown variants {unknown}; allowed: {', '.join(runs)}")
  if "mos" in selected and teacher not in selected:
    raise FlagError("runs", f"mos distills from {teacher}: list it too")
  sizes = {name: counts(config) for name, config in runs.items()}
  trained = {name: config for name, config in runs.items() if name in selected}
  rows, loss, curves = [], {}, {}
  width = 32 if quick else D_MODEL.value
  tokens_per_step = runs["dense"].batch_size * runs["dense"].seq_len
  header = (
      "Claims (DeepSpeed-MoE §4-5): MoE reaches lower validation loss than dense at the same "
      "active compute (5x lower training cost for equal quality at 1.3B/350M scale); PR-MoE "
      "matches standard MoE's quality with up to 3x fewer parameters (prmoe_vs_moe_gap ~0); MoS, "
      "12.5% fewer layers distilled with staged KD, recovers the teacher's quality "
      f"(mos_vs_teacher_gap ~0). Ours: {steps} steps ({steps * tokens_per_step} tokens) of a "
      f"{layers}-layer byte-level GPT of width {width} on "
      "one CPU device, every variant on the same batches; mos/student have "
      f"{student_layers(layers)} layers; MoE "
      + (f"capacity factor {CAPACITY.value:g}" if CAPACITY.value else "dropless")
      + ("" if RESIDUAL_MIX.value == "sum" else ", residual MLP and MoE mixed by DeepSpeed's "
         "learned per-token softmax")
      + f"; mos distilled from {teacher} ({runs[teacher].steps} steps) for the first "
      f"{runs['mos'].kd.stop_step} steps. Curves: moe_quality.png (validation loss vs tokens).")
  report_config = {"quick": quick, "steps": steps, "layers": layers, "d_model": width,
                   "num_experts": NUM_EXPERTS, "capacity_factor": CAPACITY.value,
                   "residual_mix": RESIDUAL_MIX.value, "seed": SEED.value,
                   "kd_stop_fraction": KD_STOP.value, "teacher_steps": runs[teacher].steps}
  for name, config in trained.items():  # the teacher runs before mos, which distills from it
    run_summary, records = common.fresh_run(config, os.path.join(workdir, name))
    curves[name] = _curve(run_summary, records)
    loss[name] = run_summary["val_loss"]
    kd = [r["kd_loss"] for r in records if "kd_loss" in r]
    rows.append({"model": name, "layers": config.model.num_layers,
                 "experts": str(tuple(config.moe.layer_num_experts) or config.moe.num_experts),
                 **sizes[name], "val_loss": run_summary["val_loss"],
                 "best_val_loss": min(r["val_loss"] for r in curves[name]),
                 "dropped_fraction": _dropped(records),
                 "kd_loss_first": kd[0] if kd else float("nan"),
                 "tokens_per_s": run_summary["tokens_per_s"]})
    # Rewritten after every run: a stopped run still leaves the report of the finished ones.
    summary = summarize(loss, sizes, teacher, curves)
    # The KD term of the first distilled steps: > 0 shows the student is pulled to its teacher.
    summary["mos_kd_loss_first"] = next(
        (r["kd_loss_first"] for r in rows if r["model"] == "mos"), float("nan"))
    plot(curves, os.path.join(common.OUTPUT_DIR.value, "moe_quality.png"))
    common.write_results("moe_quality", summary, rows, config=report_config, header=header)
  if any(not math.isfinite(v) for v in loss.values()):
    raise RunError("a run ended with a non-finite validation loss")


if __name__ == "__main__":
  common.run_app(main)
