"""Progressive Layer Dropping (PLD) on BERT masked-LM pretraining: time per sample and quality.

  python -m experiments.pld [--quick]

Claim (Zhang & He 2020, arXiv 2010.13369): PLD trains BERT with 24% less time
per sample (and reaches the same GLUE accuracy 2.5x faster).

Two runs of a BERT encoder (``model.name="bert"``, ``--num_layers`` post-LN
layers, d_model ``--d_model`` (256), S = 128, batch 16, masked-LM on the
default corpus) on ``--cpu_devices`` data-parallel workers, same data and steps:

* baseline: every layer runs every step (``model.remat="none"``);
* PLD (``data_efficiency.pld``): at step t layer i of L is kept with
  p_i = 1 − i(1 − θ(t))/L, θ(t) = (1 − θ̄)·exp(−γt) + θ̄, θ̄ = ``--theta``
  (0.5) and γ = ``--gamma_steps`` / steps (20 / steps: θ is within 1% of θ̄
  after 23% of the run; the paper's γ = 0.001 reaches θ̄ early in a long run too).
  A dropped layer is a ``lax.cond`` branch without matmuls. This run uses
  ``model.remat="full"``: differentiated, each cond returns the residuals
  of its layer for the backward pass (zeros when skipped), so without remat a
  skipped layer still writes its activations' worth of zeros; under remat
  its only residual is its input. Remat changes no value, only the time.

Measures:

* Step times (second table): one gradient step (forward + backward of the
  loss) of the PLD run's config, built with remat "none" and "full", on fixed
  keep masks: the baseline, every layer kept (θ = 1), ``--checkpoints`` masks
  drawn at θ̄, and the PLD run's own masks at ``--checkpoints`` evenly spaced
  steps (``pld schedule``). All timed interleaved (``common.time_interleaved``,
  ``--repeats``) so that a ratio does not move with the machine's load;
  ``time_ratio`` = PLD / baseline-without-remat per step, the median over
  matched repeats, ``ratio_p25``/``ratio_p75`` its spread.
* ``time_per_sample_saving`` = 1 − the ``pld schedule remat=full`` ratio
  (p25/p75 from the ratio's spread); ``_no_remat``: the same without remat.
  Time per sample and per step are the same ratio (same batch).
* ``val_loss_rel_gap`` = PLD / baseline final validation loss − 1 (evaluation
  runs every layer).
* ``expected_layer_saving`` = the mean over steps of (1/L)·Σ_i (1 − p_i(t)),
  the expected share of layer computation skipped; ``expected_compute_saving``
  scales it by the layers' share of the model FLOPs (per token and layer
  8d² + 4·d·d_ff + 4·S·d forward, vs 2d² + 2dV for the MLM head).
"""

from __future__ import annotations

import copy
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import jaxspeed
from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.models.layer_drop import keep_probability, pld_theta
from jaxspeed.training import plot_runs
from jaxspeed.training.step import loss_sum_fn, step_rngs

QUICK = flags.DEFINE_bool(
    "quick", False,
    "Smoke run: 3-layer BERT, d_model 64, seq 64, 20 steps, 2 masks, 2 timing repeats.")
STEPS = flags.DEFINE_integer("steps", 200, "Training steps of both runs.")
D_MODEL = flags.DEFINE_integer("d_model", 256, "BERT width (d_ff = 4 d_model).")
NUM_LAYERS = flags.DEFINE_integer("num_layers", 6, "BERT layers.")
LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate of both runs (post-LN BERT).")
THETA = flags.DEFINE_float("theta", 0.5, "θ̄: the keep-probability floor of PLD.")
GAMMA_STEPS = flags.DEFINE_float("gamma_steps", 20.0, "γ x steps: how fast θ(t) approaches θ̄.")
CHECKPOINTS = flags.DEFINE_integer("checkpoints", 4, "Steps of the PLD run whose masks are timed.")
REPEATS = flags.DEFINE_integer("repeats", 6, "Interleaved timing repeats.")

# The baseline's remat, and the PLD run's (under which a skipped layer saves only its input).
REMATS = ("none", "full")
BERT_VOCAB = 264  # 256 bytes + [MASK], rounded up to a multiple of 8


def _config(quick: bool, steps: int, pld: bool):
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1)
  config.zero.stage = 0
  config.sample_tokens = 0
  config.model.update(name="bert", vocab_size=BERT_VOCAB, num_layers=NUM_LAYERS.value,
                      d_model=D_MODEL.value, d_ff=4 * D_MODEL.value,
                      remat=REMATS[1] if pld else REMATS[0])
  config.steps = steps
  config.log_every = 1  # per-step times
  config.eval_every = max(1, steps // 6)
  config.checkpoint_every = steps
  config.eval_batches = 4
  if quick:
    config.model.update(num_layers=3, d_model=64, d_ff=256)
    config.seq_len = config.model.max_seq_len = 64
    config.eval_batches = 2
    config.eval_every = steps // 2
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


def _timed_calls(config, checkpoints: list[int]) -> tuple[dict, dict[str, list[int]]]:
  """One jitted gradient (forward + backward of the masked-LM loss) without and with PLD.

  The PLD gradient takes the ``layer_drop`` key and θ as arguments, so each (key, θ) is a
  fixed keep mask through one compiled program. Returns (label -> call, label -> the layers
  kept by each of its masks), labels suffixed with the model's remat:

  * ``baseline``: no PLD;
  * ``pld θ=1``: every layer kept (the cost of the conds);
  * ``pld θ=θ̄``: ``len(checkpoints)`` masks drawn at θ̄ (the run's late steps);
  * ``pld schedule``: the PLD run's own masks at steps ``checkpoints`` (its key, θ(t)).

  A call with several masks runs them all, so its time is their sum.
  """
  setup = jaxspeed.build(config)
  pld = config.data_efficiency.pld
  grad = jax.value_and_grad(loss_sum_fn(setup.model), has_aux=True)
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    batch = setup.to_device(setup.train_data.next_batch())
  plain = jax.jit(lambda p, b: grad(p, b, None, True))
  dropped = jax.jit(lambda p, b, key, theta: grad(p, b, {"layer_drop": key}, True,
                                                  layer_keep_theta=theta))
  keeps = jax.jit(lambda p, b, key, theta: setup.model.apply(
      {"params": p}, b["inputs"], rngs={"layer_drop": key}, layer_keep_theta=theta,
      mutable="intermediates")[1]["intermediates"])
  run_key = lambda t: step_rngs(state.rng, jnp.int32(t))["layer_drop"]
  masks = {
      "pld θ=1": [(run_key(0), 1.0)],
      f"pld θ={pld.theta:g}": [(jax.random.PRNGKey(1000 + t), pld.theta) for t in checkpoints],
      "pld schedule": [(run_key(t), pld_theta(t, pld.theta, pld.gamma)) for t in checkpoints],
  }

  def on_mesh(fn, *args):
    def run():
      with jax.set_mesh(setup.mesh):
        return jax.block_until_ready(fn(state.params, batch, *args))
    return run

  def run_all(pairs):
    runs = [on_mesh(dropped, key, jnp.float32(theta)) for key, theta in pairs]
    return lambda: [run() for run in runs]

  kept = lambda key, theta: int(np.sum(jax.tree.leaves(on_mesh(keeps, key,
                                                               jnp.float32(theta))())))
  suffix = f" remat={config.model.remat}"
  calls = {"baseline" + suffix: on_mesh(plain)} | {
      label + suffix: run_all(pairs) for label, pairs in masks.items()}
  layers = {"baseline" + suffix: [config.model.num_layers]} | {
      label + suffix: [kept(*pair) for pair in pairs] for label, pairs in masks.items()}
  return calls, layers


def step_time_table(config, repeats: int, checkpoints: list[int],
                    remats: tuple[str, ...] = REMATS) -> list[dict]:
  """ms per gradient step of each ``_timed_calls`` entry under each of ``remats``, all timed
  interleaved; ratios against the baseline under the first of them."""
  calls, layers = {}, {}
  for remat in remats:
    variant = copy.deepcopy(config)
    variant.model.remat = remat
    more_calls, more_layers = _timed_calls(variant, checkpoints)
    calls |= more_calls
    layers |= more_layers
  seconds = common.time_interleaved(calls, repeats)
  rows = []
  for label, times in seconds.items():
    per_step = times / len(layers[label])
    ratio = common.ratio_spread(per_step, seconds[f"baseline remat={remats[0]}"])
    rows.append({"variant": label, "masks": len(layers[label]),
                 "mean_layers_kept": float(np.mean(layers[label])),
                 "ms_per_step": 1e3 * float(np.median(per_step)),
                 "time_ratio": ratio["median"], "ratio_p25": ratio["p25"],
                 "ratio_p75": ratio["p75"]})
  return rows


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  steps = 20 if quick else STEPS.value
  configs = {"baseline": _config(quick, steps, pld=False), "pld": _config(quick, steps, pld=True)}
  out = os.path.join(common.OUTPUT_DIR.value, "pld")
  runs, curves, rows = {}, {}, []
  for label, config in configs.items():
    summary, curves[label] = common.fresh_run(config, os.path.join(out, label))
    runs[label] = summary
    rows.append({
        "run": label, "val_loss": summary["val_loss"],
        "initial_val_loss": summary["initial_val_loss"],
        "final_train_loss": summary["final_loss"],
        "loop_s": summary["loop_s"], "compile_s": summary["compile_s"],
        "compilations": summary["train_step_compilations"],
    })
  base, pld = rows
  checkpoints = list(np.linspace(0, steps - 1, 2 if quick else CHECKPOINTS.value).astype(int))
  # The smoke run times the PLD run's own remat only (each remat compiles three programs).
  remats = REMATS[1:] if quick else REMATS
  timing = {row["variant"]: row for row in step_time_table(
      configs["pld"], 2 if quick else REPEATS.value, checkpoints, remats)}
  ratio = lambda label, remat: timing.get(f"{label} remat={remat}", {}).get("time_ratio",
                                                                            math.nan)
  schedule = timing[f"pld schedule remat={REMATS[1]}"]
  layer_saving = expected_layer_saving(configs["pld"])
  summary = {
      "time_per_sample_saving": 1 - schedule["time_ratio"],
      "time_per_sample_saving_p25": 1 - schedule["ratio_p75"],
      "time_per_sample_saving_p75": 1 - schedule["ratio_p25"],
      "time_per_sample_saving_no_remat": 1 - ratio("pld schedule", REMATS[0]),
      "theta_one_time_ratio": ratio("pld θ=1", REMATS[1]),
      "theta_bar_time_ratio": ratio(f"pld θ={THETA.value:g}", REMATS[1]),
      "remat_baseline_time_ratio": ratio("baseline", REMATS[1]),
      "val_loss_rel_gap": pld["val_loss"] / base["val_loss"] - 1,
      "expected_layer_saving": layer_saving,
      "expected_compute_saving": layer_saving * layer_flops_share(configs["pld"]),
      "baseline_val_loss": base["val_loss"],
      "pld_val_loss": pld["val_loss"],
      "theta_bar": THETA.value,
      "gamma": configs["pld"].data_efficiency.pld.gamma,
      "num_layers": configs["pld"].model.num_layers,
      "d_model": configs["pld"].model.d_model,
      "steps": steps,
      "claim": "24% less time per sample (BERT)",
  }
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "pld.png"), key="val_loss")
  plot_runs(curves, os.path.join(common.OUTPUT_DIR.value, "pld_train.png"))
  header = (
      f"BERT masked-LM, {summary['num_layers']} layers of d_model {summary['d_model']}, with "
      f"and without progressive layer dropping (θ̄ = {THETA.value:g}, γ = "
      f"{summary['gamma']:.3g}), same steps and data. Quality: the two training runs (first "
      "table). Time: one gradient step (forward + backward of the loss) on fixed keep masks, "
      "timed interleaved with the baseline's so load drifts cancel (second table; "
      "time_ratio = PLD / baseline per step, median over matched repeats, p25/p75 its "
      "spread). `pld schedule` runs the PLD run's own masks at "
      f"{len(checkpoints)} evenly spaced steps: time_per_sample_saving = 1 − its time_ratio. "
      "Expected saving: mean over steps of (1/L)·Σ_i (1 − p_i), and that times the layers' "
      "share of the FLOPs. Paper: 24% less time per sample. Curves: pld.png (validation), "
      "pld_train.png.")
  common.write_results("pld", summary, rows + list(timing.values()), configs["pld"].to_dict(),
                       header)


if __name__ == "__main__":
  app.run(main)
