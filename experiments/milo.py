"""MiLo: INT3 experts of a trained MoE GPT, with and without low-rank compensators.

  python -m experiments.milo [--quick]

Claim (MiLo, Huang et al. 2025, arXiv:2504.02658): INT3 expert weights lose
accuracy that small low-rank compensators, with ranks chosen from expert and
weight statistics, win back at little extra memory.

One MoE GPT (``configs/gpt_tiny.py``, every ``--expert_interval``-th layer 8
experts, top-1, dropless) is trained, then its expert matrices (wi, wo) are
replaced and the validation perplexity measured (attention, gates, embeddings
stay float32):

* float32; INT4 and INT3 (group-wise asymmetric, float16 scale and minimum per
  group of ``--group_size`` rows, no compensator);
* INT3 + compensators at the same byte budget (a rank-``--mean_rank``
  compensator on every matrix, float16 U and V), shared out by
  ``energy`` (f_e · g · σ² per byte over all experts of all layers: routing
  frequency, the gain g from the matrix to the expert output measured on the
  calibration tokens, and the residual's spectrum), ``uniform``
  (every matrix ``--mean_rank``) or ``frequency`` (MiLo's DeepSeek rule per
  layer); each once from the SVD alone and once after ``--calib_steps`` Adam
  steps that train only U, V to match the float expert outputs;
* ``kurtosis``: MiLo's Mixtral rule, at whatever bytes it picks;
* ablations: the expert matrices zeroed (how much the experts matter at all),
  energy ranks from ``--iters`` rounds of MiLo's loop (SVD only; the other rows
  use one), and ``--ablation_bits`` codes alone, with energy and with uniform
  compensators (calibrated) at the same budget.

Routing statistics and calibration tokens come from ``--calib_batches``
training batches. The compressed experts run as float weights deq(Q) + U·V
(the XLA path; ``pallas_kernels.milo_matmul`` computes the same product from
the packed codes). Bytes are those of the expert matrices (codes, scales,
minimums, each compensator at its own rank); biases stay float32 everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import jaxspeed
from experiments import common
from jaxspeed.compression import milo
from jaxspeed.inference.builders import load_params
from jaxspeed.moe.experts import ExpertWeights
from jaxspeed.training.step import compute_rules

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 2 layers of width 32, 8 steps.")
STEPS = flags.DEFINE_integer("steps", 1500, "Training steps of the MoE model.")
LAYERS = flags.DEFINE_integer("layers", 4, "Layers of the model.")
EXPERT_INTERVAL = flags.DEFINE_integer("expert_interval", 1, "Every n-th layer is an MoE layer.")
BITS = flags.DEFINE_integer("bits", 3, "Bits of the compressed experts (config.milo.bits).")
GROUP_SIZE = flags.DEFINE_integer("group_size", 64, "Rows per scale group.")
MEAN_RANK = flags.DEFINE_integer("mean_rank", 4, "Budget: rank per expert matrix on average.")
CALIB_STEPS = flags.DEFINE_integer("calib_steps", 200, "Adam steps fitting U, V per layer.")
CALIB_LR = flags.DEFINE_float("calib_lr", 1e-3, "Their learning rate.")
CALIB_BATCHES = flags.DEFINE_integer("calib_batches", 4, "Training batches for statistics.")
EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 16, "Validation batches for perplexity.")
ABLATION_BITS = flags.DEFINE_integer("ablation_bits", 2, "Bits of the lower-bit ablation rows.")
ITERS = flags.DEFINE_integer("iters", 10, "Rounds of MiLo's loop in the rounds ablation row.")
NUM_EXPERTS = 8
MAX_TOKENS = 1024  # calibration tokens kept per expert


def model_config(quick: bool, steps: int, layers: int):
  config = common.small_moe_gpt(quick, steps, layers)
  config.moe.update(num_experts=NUM_EXPERTS, expert_interval=EXPERT_INTERVAL.value,
                    drop_tokens=False)
  if not quick:
    config.eval_batches = EVAL_BATCHES.value
  return config


def moe_layers(params) -> list[str]:
  return [name for name in sorted(params) if "moe" in params[name]]


def experts_of(params, layer: str) -> ExpertWeights:
  m = params[layer]["moe"]
  return ExpertWeights(m["wi"], m["wi_bias"], m["wo"], m["wo_bias"])


def with_experts(params, replaced: dict[str, ExpertWeights]):
  """A copy of params with each named layer's expert weights replaced."""
  out = dict(params)
  for layer, w in replaced.items():
    out[layer] = {**params[layer], "moe": {**params[layer]["moe"], **w._asdict()}}
  return out


def routing_statistics(setup, params, batches: int) -> dict[str, milo.LayerStats]:
  """Per MoE layer: the tokens routed to each expert and their counts.

  The layer input is the output of its ``ln_mlp`` (pre-LN GPT); top-1 routing
  is the argmax of the gate logits, as in evaluation (no noise, dropless).
  """
  layers = moe_layers(params)
  capture = jax.jit(lambda p, x: setup.model.apply(
      {"params": p}, x, capture_intermediates=lambda m, _: m.name == "ln_mlp")[1])
  inputs = {layer: [] for layer in layers}
  with nn.logical_axis_rules(compute_rules()):
    for i in range(batches):
      acts = capture(params, setup.to_device(setup.train_data.batch_at(i))["inputs"])
      for layer in layers:
        x = acts["intermediates"][layer]["ln_mlp"]["__call__"][0]
        inputs[layer].append(np.asarray(x).reshape(-1, x.shape[-1]))
  out = {}
  for layer in layers:
    x = np.concatenate(inputs[layer])
    expert = np.argmax(x @ np.asarray(params[layer]["moe"]["gate"]), axis=-1)
    counts = np.bincount(expert, minlength=NUM_EXPERTS)
    t = min(MAX_TOKENS, max(int(counts.max()), 1))
    tokens = np.zeros((NUM_EXPERTS, t, x.shape[-1]), np.float32)
    mask = np.zeros((NUM_EXPERTS, t), np.float32)
    for e in range(NUM_EXPERTS):
      rows = x[expert == e][:t]
      tokens[e, :len(rows)], mask[e, :len(rows)] = rows, 1
    out[layer] = milo.LayerStats(tokens, mask, counts)
  return out


def findings(by: dict, q: str, lq: str, recovered, iters: int) -> str:
  """The rows' comparisons in words, for the report's header."""
  ppl = lambda name: by[name]["ppl"]
  pct = lambda name: f"{100 * recovered(name):.0f}%"
  return (
      f"Float32 perplexity {ppl('float32'):.4g}; with the expert matrices zeroed "
      f"{ppl('experts_zeroed'):.4g}. {q.upper()} codes alone {ppl(q):.4g} "
      f"(INT4 {ppl('int4'):.4g}). At the same extra bytes "
      f"({by[q + '+uniform']['bytes_ratio_vs_fp32']:.3f} of float32 vs "
      f"{by[q]['bytes_ratio_vs_fp32']:.3f} for the codes), the compensators close, of the "
      f"{q.upper()} gap: energy ranks {pct(q + '+energy')} from the SVD alone, "
      f"{pct(q + '+energy+calib')} calibrated (perplexity {ppl(q + '+energy+calib'):.4g} vs "
      f"INT4's {ppl('int4'):.4g} at {by['int4']['bytes_ratio_vs_fp32']:.3f} of float32); "
      f"uniform ranks {pct(q + '+uniform')}, "
      f"{pct(q + '+uniform+calib')}; MiLo's frequency rule {pct(q + '+frequency')}, "
      f"{pct(q + '+frequency+calib')}; energy ranks after {iters} rounds of MiLo's "
      f"loop {pct(f'{q}+energy+iters{iters}')} (SVD only). {lq.upper()} ablation: "
      f"perplexity {ppl(lq):.4g}; "
      f"energy + calibration closes {pct(lq + '+energy+calib')} of its gap, uniform + "
      f"calibration {pct(lq + '+uniform+calib')}.")


def main(argv):
  del argv
  common.setup_devices(1)
  quick = QUICK.value
  steps, layers = (8, 2) if quick else (STEPS.value, LAYERS.value)
  group_size = 32 if quick else GROUP_SIZE.value
  mean_rank = 2 if quick else MEAN_RANK.value
  calib_steps, calib_batches = (5, 1) if quick else (CALIB_STEPS.value, CALIB_BATCHES.value)
  # Every MiLo setting is checked before anything trains or compiles.
  base = milo.MiloConfig(bits=BITS.value, group_size=group_size, mean_rank=mean_rank,
                         calib_steps=calib_steps, calib_lr=CALIB_LR.value)
  low = dataclasses.replace(base, bits=ABLATION_BITS.value)
  dataclasses.replace(base, iters=ITERS.value)  # checked now, used after training
  config = model_config(quick, steps, layers)
  for k in (config.model.d_model, config.model.d_ff):
    milo.check_bits(base.bits, base.group_size, k)
  workdir = os.path.join(common.OUTPUT_DIR.value, "milo_run")
  common.fresh_run(config, workdir)
  setup, params = load_params(config, workdir)

  with jax.set_mesh(setup.mesh):
    params = jax.device_get(params)
    stats = routing_statistics(setup, params, calib_batches)
    floats = {layer: experts_of(params, layer).cast(jnp.float32) for layer in stats}
    fp32_bytes = sum(w.wi.nbytes + w.wo.nbytes for w in floats.values())

    def evaluate(replaced) -> float:
      return jaxspeed.evaluate(setup, with_experts(params, replaced))

    rows = [{"variant": "float32", "bits": 32, "allocation": "", "calibrated": False,
             "mean_rank": 0.0, "expert_bytes": fp32_bytes, "val_loss": evaluate({})}]
    calib_loss = {}

    def run(name, cfg, allocation, calibrated):
      if allocation:
        ranks = milo.choose_ranks(dataclasses.replace(cfg, allocation=allocation), floats, stats)
      else:
        ranks = {layer: (np.zeros(NUM_EXPERTS, int),) * 2 for layer in floats}
      replaced, nbytes, losses = {}, 0, []
      for layer, (r_wi, r_wo) in ranks.items():
        c = milo.compress_experts(floats[layer], r_wi, r_wo, cfg)
        if calibrated:
          c, loss = milo.calibrate(c, floats[layer], jnp.asarray(stats[layer].tokens),
                                   jnp.asarray(stats[layer].mask), steps=cfg.calib_steps,
                                   learning_rate=cfg.calib_lr)
          losses.append((loss[0], loss[-1]) if loss else (math.nan, math.nan))
        replaced[layer] = c.dequantize()
        nbytes += c.wi.nbytes + c.wo.nbytes
      if losses:
        calib_loss[name] = tuple(float(np.mean(v)) for v in zip(*losses, strict=True))
      all_ranks = np.concatenate([np.concatenate(r) for r in ranks.values()])
      rows.append({"variant": name, "bits": cfg.bits, "allocation": allocation,
                   "calibrated": calibrated, "mean_rank": float(all_ranks.mean()),
                   "expert_bytes": nbytes, "val_loss": evaluate(replaced)})
      return ranks

    # How much the experts matter at all: their matrices zeroed (biases kept).
    rows.append({"variant": "experts_zeroed", "bits": 0, "allocation": "", "calibrated": False,
                 "mean_rank": 0.0, "expert_bytes": 0, "val_loss": evaluate(
                     {layer: w._replace(wi=0 * w.wi, wo=0 * w.wo) for layer, w in floats.items()})})
    run("int4", milo.MiloConfig(bits=4, group_size=group_size), "", False)
    run(f"int{base.bits}", base, "", False)
    energy_ranks = None
    for allocation in ("energy", "uniform", "frequency", "kurtosis"):
      for calibrated in (False, True):
        name = f"int{base.bits}+{allocation}" + ("+calib" if calibrated else "")
        ranks = run(name, base, allocation, calibrated)
        energy_ranks = energy_ranks if allocation != "energy" else ranks
    # MiLo's alternating quantize / SVD loop at its default 10 rounds (ablation).
    rounds = dataclasses.replace(base, iters=ITERS.value)
    run(f"int{base.bits}+energy+iters{rounds.iters}", rounds, "energy", False)
    # The same compensators where the codes lose more (ablation).
    run(f"int{low.bits}", low, "", False)
    for allocation in ("energy", "uniform"):
      run(f"int{low.bits}+{allocation}+calib", low, allocation, True)

  for row in rows:
    row["ppl"] = math.exp(row["val_loss"])
    row["bytes_ratio_vs_fp32"] = row["expert_bytes"] / fp32_bytes
  by = {r["variant"]: r for r in rows}
  q, lq = f"int{base.bits}", f"int{low.bits}"

  def recovered(name: str) -> float:
    """Share of its bit width's gap to float32 the variant closes (1 - gap / codes-only gap)."""
    codes = by[f"int{by[name]['bits']}"]["ppl"] if by[name]["bits"] in (2, 3, 4) else None
    gap = codes - by["float32"]["ppl"] if codes is not None else 0.0
    return (codes - by[name]["ppl"]) / gap if gap else math.nan

  for row in rows:
    row["gap_recovered"] = recovered(row["variant"])
  best = f"{q}+energy+calib"
  freq = np.concatenate([stats[layer].counts for layer in energy_ranks])
  rank_sum = np.concatenate([r[0] + r[1] for r in energy_ranks.values()])
  summary = {
      "float_ppl": by["float32"]["ppl"],
      "int4_ppl": by["int4"]["ppl"],
      f"{q}_ppl": by[q]["ppl"],
      "milo_ppl": by[best]["ppl"],
      "milo_svd_only_ppl": by[f"{q}+energy"]["ppl"],
      "milo_svd_only_iters_ppl": by[f"{q}+energy+iters{ITERS.value}"]["ppl"],
      "uniform_ppl": by[f"{q}+uniform+calib"]["ppl"],
      "uniform_svd_only_ppl": by[f"{q}+uniform"]["ppl"],
      "frequency_ppl": by[f"{q}+frequency+calib"]["ppl"],
      "kurtosis_ppl": by[f"{q}+kurtosis+calib"]["ppl"],
      "milo_ppl_gap_recovered": recovered(best),
      "milo_svd_only_gap_recovered": recovered(f"{q}+energy"),
      "uniform_gap_recovered": recovered(f"{q}+uniform+calib"),
      "milo_bytes_ratio_vs_fp32": by[best]["bytes_ratio_vs_fp32"],
      "uniform_bytes_ratio_vs_fp32": by[f"{q}+uniform+calib"]["bytes_ratio_vs_fp32"],
      f"int{base.bits}_bytes_ratio_vs_fp32": by[q]["bytes_ratio_vs_fp32"],
      "int4_bytes_ratio_vs_fp32": by["int4"]["bytes_ratio_vs_fp32"],
      "kurtosis_bytes_ratio_vs_fp32": by[f"{q}+kurtosis+calib"]["bytes_ratio_vs_fp32"],
      # Does the energy rule favour frequently used experts? Correlation of an expert's
      # routed tokens with its wi + wo rank, over the experts of all MoE layers.
      "energy_rank_frequency_corr": float(np.corrcoef(freq, rank_sum)[0, 1])
      if rank_sum.std() > 0 and freq.std() > 0 else math.nan,
      "experts_zeroed_ppl": by["experts_zeroed"]["ppl"],
      f"{lq}_ppl": by[lq]["ppl"],
      f"{lq}_milo_ppl": by[f"{lq}+energy+calib"]["ppl"],
      f"{lq}_uniform_ppl": by[f"{lq}+uniform+calib"]["ppl"],
      f"{lq}_milo_gap_recovered": recovered(f"{lq}+energy+calib"),
      f"{lq}_uniform_gap_recovered": recovered(f"{lq}+uniform+calib"),
      "calib_loss_first": calib_loss[best][0],
      "calib_loss_last": calib_loss[best][1],
  }
  ranks_text = "; ".join(
      f"{layer}: tokens {stats[layer].counts.tolist()}, wi {r[0].tolist()}, wo {r[1].tolist()}"
      for layer, r in energy_ranks.items())
  header = (
      "Claim (MiLo): INT3 MoE experts plus low-rank compensators keep most of the float "
      "model's quality (87% of Wikitext2 perplexity kept on Mixtral-8x7B / DeepSeek-MoE at a "
      "22% compression ratio). Ours: a "
      f"{layers}-layer byte-level GPT ({config.model.d_model} wide, {NUM_EXPERTS} experts of "
      f"d_ff {config.model.d_ff}, top-1) trained {steps} steps; expert matrices compressed "
      f"with group size {group_size}, compensator budget mean rank {mean_rank}; perplexity "
      f"per byte on {config.eval_batches} validation batches.\n\n"
      + findings(by, q, lq, recovered, ITERS.value) + f"\n\nEnergy ranks: {ranks_text}.")
  common.write_results(
      "milo", summary, rows,
      config={"quick": quick, "steps": steps, "layers": layers, "bits": base.bits,
              "group_size": group_size, "mean_rank": mean_rank, "calib_steps": calib_steps,
              "calib_lr": base.calib_lr, "calib_batches": calib_batches,
              "eval_batches": config.eval_batches, "num_experts": NUM_EXPERTS},
      header=header)


if __name__ == "__main__":
  common.run_app(main)
