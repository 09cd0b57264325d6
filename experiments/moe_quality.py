"""MoE quality: dense vs MoE vs PR-MoE vs Residual-MoE vs MoS student, same data and steps.

  python -m experiments.moe_quality [--quick]

Claims (DeepSpeed-MoE, Rajbhandari et al. 2022, arXiv 2201.05596): an MoE
model reaches a lower validation loss than the dense model with the same
active compute per token; PR-MoE (pyramid + residual) keeps most of that gain
with fewer parameters; MoS (a PR-MoE student with fewer layers, distilled from
the PR-MoE teacher) keeps it with fewer still.

Runs, all the GPT of ``configs/gpt_tiny.py`` at ``--layers`` layers on the
default corpus, ``--steps`` steps each:

* dense: every layer an MLP;
* moe: every 2nd layer E = 8 experts, top-1 (DeepSpeed's MoE-8);
* prmoe: pyramid (4 experts in the first MoE layer, 8 in the last ones) plus a
  residual MLP beside each MoE (``moe.layer_num_experts``, ``moe.use_residual``);
* residual: 8 experts, top-1, plus the residual MLP (Residual-MoE);
* mos: a PR-MoE student with two layers fewer, distilled from the prmoe run
  (``kd``: T = 1, α = β = 1, KD stopped after ``--kd_stop_fraction`` of the
  steps: staged KD); with ``--teacher_steps`` from a ``teacher`` run, the
  prmoe model trained that many steps (the paper distills a trained teacher);
* student: the same student without distillation, to show what KD adds
  (skipped by ``--quick``). ``teacher_gain_over_student`` (student − teacher
  validation loss) says whether the teacher is the better model at all: KD
  pulls the student toward the teacher, so it cannot help when that is ≤ 0.

Runs on one device unless ``--cpu_devices`` is given. Parameters are counted
from the initialized model; active parameters per token count only top-k of
the E experts of each MoE layer (``jaxspeed.moe.param_counts``). Validation
loss is the trainer's final evaluation (cross-entropy only, no aux term), on
``eval_batches`` held-out batches.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags

import jaxspeed
from experiments import common
from jaxspeed.moe import param_counts

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 4 layers of width 32, 8 steps.")
STEPS = flags.DEFINE_integer("steps", 200, "Training steps of every run.")
LAYERS = flags.DEFINE_integer("layers", 6, "Layers of the dense, MoE and teacher models.")
KD_STOP = flags.DEFINE_float("kd_stop_fraction", 0.75, "Staged KD: share of steps distilled.")
TEACHER_STEPS = flags.DEFINE_integer(
    "teacher_steps", 0, "Train the MoS teacher (the prmoe model) for this many steps in its own "
    "run; 0: distill from the prmoe run itself.")
NUM_EXPERTS = 8


def _base(quick: bool, steps: int, layers: int):
  config = common.small_moe_gpt(quick, steps, layers)
  config.moe.expert_interval = 2
  return config


def _pyramid(moe_layers: int) -> tuple[int, ...]:
  """PR-MoE: half the experts in the first MoE layer(s), all of them in the deeper ones."""
  half = max(1, moe_layers // 2)
  return tuple(NUM_EXPERTS // 2 if i < moe_layers - half else NUM_EXPERTS
               for i in range(moe_layers))


def configs(quick: bool, steps: int, layers: int, teacher_dir: str, kd_stop: float,
            teacher_steps: int = 0) -> dict:
  """The runs, in order; ``teacher_dir`` is the workdir of the prmoe run, or with
  ``teacher_steps`` of the extra ``teacher`` run (prmoe trained that long)."""
  runs = {}
  runs["dense"] = _base(quick, steps, layers)
  runs["moe"] = _base(quick, steps, layers)
  runs["moe"].moe.num_experts = NUM_EXPERTS
  runs["prmoe"] = _base(quick, steps, layers)
  runs["prmoe"].moe.update(layer_num_experts=_pyramid(layers // 2), use_residual=True)
  runs["residual"] = _base(quick, steps, layers)
  runs["residual"].moe.update(num_experts=NUM_EXPERTS, use_residual=True)
  if teacher_steps:
    runs["teacher"] = _base(quick, teacher_steps, layers)
    runs["teacher"].moe.update(layer_num_experts=_pyramid(layers // 2), use_residual=True)
  student_layers = layers - 2
  for name in ("mos",) if quick else ("mos", "student"):
    runs[name] = _base(quick, steps, student_layers)
    runs[name].moe.update(layer_num_experts=_pyramid(student_layers // 2), use_residual=True)
  runs["mos"].kd.update(enabled=True, teacher_workdir=teacher_dir, num_layers_teacher=layers,
                        num_experts_teacher=_pyramid(layers // 2),
                        stop_step=max(1, round(kd_stop * steps)))
  return runs


def counts(config) -> dict[str, int]:
  setup = jaxspeed.build(config)
  with jax.set_mesh(setup.mesh):
    params = jax.eval_shape(setup.init_state).params
  return param_counts(params, config.moe.top_k)


def main(argv):
  del argv
  # One device unless --cpu_devices is given: quality needs no parallelism, and with 8
  # virtual devices on a loaded 2-core host XLA:CPU's in-process all-reduce rendezvous
  # can exceed its 40 s termination timeout and abort the run.
  common.setup_devices(None if flags.FLAGS["cpu_devices"].present else 1)
  quick = QUICK.value
  steps = 8 if quick else STEPS.value
  layers = 4 if quick else LAYERS.value
  workdir = os.path.join(common.OUTPUT_DIR.value, "moe_quality_runs")
  teacher = "teacher" if TEACHER_STEPS.value else "prmoe"
  runs = configs(quick, steps, layers, os.path.join(workdir, teacher), KD_STOP.value,
                 TEACHER_STEPS.value)
  rows, summary = [], {}
  for name, config in runs.items():  # the teacher runs before mos, which distills from it
    run_summary, _ = common.fresh_run(config, os.path.join(workdir, name))
    sizes = counts(config)
    rows.append({"model": name, "layers": config.model.num_layers,
                 "experts": str(tuple(config.moe.layer_num_experts) or config.moe.num_experts),
                 **sizes, "val_loss": run_summary["val_loss"],
                 "tokens_per_s": run_summary["tokens_per_s"]})
    summary[f"{name}_val_loss"] = run_summary["val_loss"]
    summary[f"{name}_params"] = sizes["params"]
    summary[f"{name}_active_params"] = sizes["active_params"]
  summary["moe_gain_over_dense"] = summary["dense_val_loss"] - summary["moe_val_loss"]
  summary["prmoe_gain_kept"] = ((summary["dense_val_loss"] - summary["prmoe_val_loss"])
                                / summary["moe_gain_over_dense"]
                                if summary["moe_gain_over_dense"] else float("nan"))
  summary["prmoe_param_ratio"] = summary["prmoe_params"] / summary["moe_params"]
  summary["mos_param_ratio"] = summary["mos_params"] / summary["moe_params"]
  if "student_val_loss" in summary:
    # KD can only pull the student toward the teacher: it helps if the teacher is the
    # better model (teacher_gain > 0), which at a few hundred steps a deeper one need not be.
    summary["teacher_gain_over_student"] = (summary["student_val_loss"]
                                            - summary[f"{teacher}_val_loss"])
    summary["mos_gain_over_student"] = summary["student_val_loss"] - summary["mos_val_loss"]
  header = ("Claim (DeepSpeed-MoE): MoE reaches lower validation loss than dense at the same "
            "active compute (5x lower training cost for equal quality at 1.3B/350M scale); "
            "PR-MoE keeps it with up to 3x fewer parameters, MoS a further 12.5% smaller "
            f"(up to 3.7x). Ours: {steps} steps of a {layers}-layer byte-level GPT on one CPU "
            "host; mos/student have 2 layers fewer.")
  common.write_results("moe_quality", summary, rows,
                       config={"quick": quick, "steps": steps, "layers": layers,
                               "num_experts": NUM_EXPERTS, "kd_stop_fraction": KD_STOP.value,
                               "teacher_steps": TEACHER_STEPS.value or steps},
                       header=header)


if __name__ == "__main__":
  app.run(main)
