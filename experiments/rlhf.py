"""DeepSpeed-Chat's three steps end to end, plus DPO and GRPO on the same task.

  python -m experiments.rlhf --config=configs/rlhf_tiny.py
  python -m experiments.rlhf --config=configs/rlhf_tiny.py --stages=ppo   # alone, from sft+reward

Pre-trains a GPT on Python's docs and sources, fine-tunes it on prompt +
true continuation (SFT), trains a reward model to prefer true continuations
over shuffled or swapped ones, then optimizes the actor against it with PPO
(reference KL, GAE, clipped losses, EMA) through the hybrid engine. Reports
the reward model's held-out accuracy, the reward and KL over PPO iterations,
sampled answers before and after, and the generation / training time split.

The split: ``generate_fraction`` is the share of PPO's time spent generating,
first compilations included; ``generate_fraction_steady`` the median over the
iterations after the first of each iteration's generate / (generate + train)
seconds, with quartiles (``_p25`` / ``_p75``). Generation and training alternate
in every iteration, so both see the same load; the spread shows how much it moved.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from experiments import common

CONFIG = config_flags.DEFINE_config_file("config", "configs/rlhf_tiny.py", "Config file.")
WORKDIR = flags.DEFINE_string("workdir", "results/rlhf_run", "Checkpoints of every step.")
STAGES = flags.DEFINE_list("stages", ["pretrain", "sft", "reward", "ppo", "dpo", "grpo"],
                           "Steps to run, in order; each starts from the previous one's "
                           "checkpoint in --workdir.")
QUICK = flags.DEFINE_bool("quick", False, "A tiny smoke run of every step.")

CLAIM = ("DeepSpeed-Chat (Yao et al. 2023): step 2's reward model ranks the chosen answer "
         "above the rejected one; step 3 raises the reward-model score of the actor's answers "
         "while the KL penalty keeps it near the SFT model. Target here: held-out pairwise "
         "accuracy >= 0.8, reward_end > reward_start with a bounded kl_end.")


def quick(config):
  """Every size cut down so that all steps run in well under a minute."""
  config.steps, config.batch_size, config.seq_len = 20, 16, 32
  config.log_every, config.eval_every, config.eval_batches, config.checkpoint_every = 10, 20, 1, 20
  config.model.update(num_layers=2, d_model=32, d_ff=64, max_seq_len=32)
  # ZeRO-3 over however many devices --cpu_devices gives (the test uses 2: fast to compile).
  config.parallel.update(data=1, fsdp=-1, tensor=1)
  rlhf = config.rlhf
  rlhf.update(prompt_len=16, answer_len=8, num_pairs=64, eval_pairs=16)
  rlhf.sft.update(steps=4, batch_size=16)
  rlhf.reward.update(steps=6, batch_size=16)
  rlhf.ppo.update(iterations=3, batch_size=16)
  rlhf.dpo.update(steps=3, batch_size=16)
  rlhf.grpo.update(iterations=2, prompts=4, group_size=4)
  return config


def plot(records: dict[str, list[dict]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
  for name in ("ppo", "grpo"):
    rows = records.get(name) or []
    if rows:
      steps, scores = [r["iteration"] for r in rows], [r["score"] for r in rows]
      line, = ax_reward.plot(steps, scores, alpha=0.35)
      window = max(1, len(rows) // 10)
      smooth = np.convolve(scores, np.ones(window) / window, mode="valid")
      ax_reward.plot(steps[window - 1:], smooth, color=line.get_color(),
                     label=f"{name} (mean of {window})")
      ax_kl.plot([r["iteration"] for r in rows], [r["kl"] for r in rows], label=name)
  ax_reward.set(xlabel="iteration", ylabel="reward-model score of sampled answers")
  ax_kl.set(xlabel="iteration", ylabel="KL(actor || reference) per answer")
  for ax in (ax_reward, ax_kl):
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  common.setup_devices()
  import jax

  from jaxspeed.config import RLHF_STAGES
  from jaxspeed.errors import ConfigError
  from jaxspeed.rlhf import STEPS, make_context

  config = quick(CONFIG.value) if QUICK.value else CONFIG.value
  unknown = [s for s in STAGES.value if s not in RLHF_STAGES]
  if unknown:
    print(f"error: --stages: unknown {', '.join(unknown)}; allowed: {', '.join(RLHF_STAGES)}",
          file=sys.stderr)
    sys.exit(2)
  try:
    context = make_context(config, WORKDIR.value)
    summary, records, samples = {}, {}, {}
    with jax.set_mesh(context.mesh):
      for stage in STAGES.value:
        stage_summary, records[stage] = STEPS[stage](context)
        samples.update({k: v for k, v in stage_summary.items() if k.startswith("samples")})
        summary.update({k: v for k, v in stage_summary.items() if not k.startswith("samples")})
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  steady = records.get("ppo", [])[1:]  # the first iteration compiles both phases
  if steady:
    spread = common.ratio_spread([r["generate_s"] for r in steady],
                                 [r["generate_s"] + r["train_s"] for r in steady])
    summary.update({"generate_fraction_steady": spread["median"],
                    "generate_fraction_steady_p25": spread["p25"],
                    "generate_fraction_steady_p75": spread["p75"]})
  rows = [{"stage": stage, "iteration": r["iteration"], "reward": r["score"], "kl": r["kl"],
           "policy_loss": r.get("actor_loss", r.get("loss"))}
          for stage in ("ppo", "grpo") for r in records.get(stage, [])]
  header = CLAIM
  for key, answers in samples.items():
    header += f"\n\n{key}:\n" + "\n".join(f"    {a!r}" for a in answers)
  common.write_results("rlhf", summary, rows, {**config.to_dict(), "stages": STAGES.value},
                       header=header)
  plot(records, os.path.join(common.OUTPUT_DIR.value, "rlhf.png"))


if __name__ == "__main__":
  common.run_app(main)
