"""``experiments.rlhf --quick``: every step end to end, then PPO alone from the saved steps."""

import json
import os

import pytest
from helpers import run_experiment_subprocess as run_experiment


@pytest.mark.slow
def test_rlhf_quick_then_ppo_alone(tmp_path):
  workdir = tmp_path / "run"
  payload = run_experiment("rlhf", tmp_path, f"--workdir={workdir}", "--cpu_devices=2",
                           timeout=900)
  summary = payload["summary"]
  for key in ("sft_val_loss", "rm_accuracy", "reward_start", "reward_end", "kl_end",
              "generate_fraction", "dpo_loss_end", "heldout_reward_grpo"):
    assert key in summary, key
  assert summary["sft_val_loss"] < summary["sft_val_loss_start"]
  assert 0 <= summary["rm_accuracy"] <= 1
  assert 0 < summary["generate_fraction"] < 1
  # Per-iteration split after the first (compiling) iteration: a median inside its quartiles.
  assert 0 < summary["generate_fraction_steady_p25"] <= summary["generate_fraction_steady"] \
      <= summary["generate_fraction_steady_p75"] < 1
  # ZeRO-3 training shards -> replicated generation parameters: the switch all-gathers.
  assert summary["reshard_bytes_per_device"] > 0
  assert {r["stage"] for r in payload["rows"]} == {"ppo", "grpo"}
  for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo"):
    with open(workdir / stage / "stage.json") as f:
      assert json.load(f)["stage"] == stage
  assert os.path.exists(tmp_path / "rlhf.png")

  alone = run_experiment("rlhf", tmp_path / "alone", f"--workdir={workdir}", "--cpu_devices=2",
                         "--stages=ppo", timeout=600)
  assert set(alone["summary"]) >= {"reward_start", "reward_end", "kl_end"}
  # The same SFT actor and reward model, the same prompts and seeds: the same first iteration.
  assert alone["summary"]["reward_start"] == pytest.approx(summary["reward_start"], rel=1e-4)
