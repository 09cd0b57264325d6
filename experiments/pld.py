"""Progressive Layer Dropping (PLD) on BERT masked-LM pretraining: time per sample and quality.

  python -m experiments.pld [--quick]

Claim (Zhang & He 2020, arXiv 2010.13369): PLD trains BERT with 24% less time
per sample (and reaches the same GLUE accuracy 2.5x faster).

Two runs of a BERT encoder (``model.name="bert"``, ``--num_layers`` post-LN
layers, d_model 128, S = 128, batch 16, masked-LM on the default corpus) on
``--cpu_devices`` data-parallel workers, same data and steps:

* baseline: every layer runs every step;
* PLD (``data_efficiency.pld``): at step t layer i of L is kept with
  p_i = 1 − i(1 − θ(t))/L, θ(t) = (1 − θ̄)·exp(−γt) + θ̄, θ̄ = ``--theta``
  (0.5) and γ = ``--gamma_steps`` / steps (20 / steps: θ is within 1% of θ̄
  after 23% of the run; the paper's γ = 0.001 reaches θ̄ early in a long run too).
  A dropped layer is a ``lax.cond`` branch that does no work.

Measures:

* ``time_per_sample_saving`` = 1 − PLD / baseline mean wall time per sample,
  from the per-step times of ``metrics.jsonl`` (logged every step, each step
  ends in a device sync), leaving out the first (compiling) step and the steps
  after an evaluation. Means, not medians: PLD's step time varies with the
  layers drawn. ``time_per_sample_saving_loop`` uses (loop_s − compile_s) /
  samples instead (evaluation included in both).
* ``val_loss_rel_gap`` = PLD / baseline final validation loss − 1 (evaluation
  runs every layer).
* ``expected_layer_saving`` = the mean over steps of (1/L)·Σ_i (1 − p_i(t)),
  the expected share of layer computation skipped; ``expected_compute_saving``
  scales it by the layers' share of the model FLOPs (per token and layer
  8d² + 4·d·d_ff + 4·S·d forward, vs 2d² + 2dV for the MLM head).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.models.layer_drop import keep_probability, pld_theta
from jaxspeed.training import plot_runs

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 3-layer BERT, d_model 64, seq 64, 30 steps.")
STEPS = flags.DEFINE_integer("steps", 300, "Training steps of both runs.")
NUM_LAYERS = flags.DEFINE_integer("num_layers", 6, "BERT layers.")
LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate of both runs (post-LN BERT).")
THETA = flags.DEFINE_float("theta", 0.5, "θ̄: the keep-probability floor of PLD.")
GAMMA_STEPS = flags.DEFINE_float("gamma_steps", 20.0, "γ x steps: how fast θ(t) approaches θ̄.")

BERT_VOCAB = 264  # 256 bytes + [MASK], rounded up to a multiple of 8


def _config(quick: bool, steps: int, pld: bool):
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1)
  config.zero.stage = 0
  config.sample_tokens = 0
  config.model.update(name="bert", vocab_size=BERT_VOCAB, num_layers=NUM_LAYERS.value)
  config.steps = steps
  config.log_every = 1  # per-step times
  config.eval_every = max(1, steps // 6)
  config.checkpoint_every = steps
  config.eval_batches = 4
  if quick:
    config.model.update(num_layers=3, d_model=64, d_ff=256)
    config.seq_len = config.model.max_seq_len = 64
    config.eval_batches = 2
  config.optim.update(learning_rate=LR.value, warmup=max(1, steps // 10))
  if pld:
    config.data_efficiency.pld.update(enabled=True, theta=THETA.value,
                                      gamma=GAMMA_STEPS.value / steps)
  return config


def expected_layer_saving(config) -> float:
  """Mean over steps of (1/L)·Σ_i (1 − p_i(t)): the expected share of layers skipped."""
  pld, layers = config.data_efficiency.pld, config.model.num_layers
  i = np.arange(1, layers + 1)
  return float(np.mean([np.mean(1 - keep_probability(i, layers, pld_theta(t, pld.theta,
                                                                           pld.gamma)))
                        for t in range(config.steps)]))


def layer_flops_share(config) -> float:
  """Share of forward FLOPs per token in the encoder layers (vs the MLM head)."""
  m = config.model
  d = m.d_model
  layers = m.num_layers * (8 * d * d + 4 * d * m.d_ff + 4 * config.seq_len * d)
  return layers / (layers + 2 * d * d + 2 * d * m.vocab_size)


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  steps = 30 if quick else STEPS.value
  configs = {"baseline": _config(quick, steps, pld=False), "pld": _config(quick, steps, pld=True)}
  out = os.path.join(common.OUTPUT_DIR.value, "pld")
  runs, curves, rows = {}, {}, []
  for label, config in configs.items():
    summary, curves[label] = common.fresh_run(config, os.path.join(out, label))
    runs[label] = summary
    times = common.clean_step_seconds(curves[label], config.eval_every)[0]
    samples = config.steps * config.batch_size
    rows.append({
        "run": label, "val_loss": summary["val_loss"],
        "initial_val_loss": summary["initial_val_loss"],
        "final_train_loss": summary["final_loss"],
        "ms_per_sample": 1e3 * float(np.mean(times)) / config.batch_size,
        "ms_per_sample_loop": 1e3 * (summary["loop_s"] - summary["compile_s"]) / samples,
        "clean_steps": len(times), "loop_s": summary["loop_s"],
        "compile_s": summary["compile_s"], "compilations": summary["train_step_compilations"],
    })
  base, pld = rows
  layer_saving = expected_layer_saving(configs["pld"])
  summary = {
      "time_per_sample_saving": 1 - pld["ms_per_sample"] / base["ms_per_sample"],
      "time_per_sample_saving_loop": 1 - pld["ms_per_sample_loop"] / base["ms_per_sample_loop"],
      "val_loss_rel_gap": pld["val_loss"] / base["val_loss"] - 1,
      "expected_layer_saving": layer_saving,
      "expected_compute_saving": layer_saving * layer_flops_share(configs["pld"]),
      "baseline_val_loss": base["val_loss"],
      "pld_val_loss": pld["val_loss"],
      "theta_bar": THETA.value,
      "gamma": configs["pld"].data_efficiency.pld.gamma,
      "num_layers": configs["pld"].model.num_layers,
      "steps": steps,
      "claim": "24% less time per sample (BERT)",
  }
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "pld.png"), key="val_loss")
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "pld_train.png"))
  header = (
      f"BERT masked-LM, {summary['num_layers']} layers, with and without progressive layer "
      f"dropping (θ̄ = {THETA.value:g}, γ = {summary['gamma']:.3g}), same steps and data. Time "
      "per sample: mean wall time of the steps that neither compile nor follow an evaluation "
      "(_loop: (loop_s − compile_s) / samples). Expected saving: mean over steps of "
      "(1/L)·Σ_i (1 − p_i), and that times the layers' share of the FLOPs. Paper: 24% less "
      "time per sample. Curves: pld.png (validation), pld_train.png.")
  common.write_results("pld", summary, rows, configs["pld"].to_dict(), header)


if __name__ == "__main__":
  app.run(main)
