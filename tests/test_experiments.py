"""Every experiment's ``--quick`` run works and follows the output convention."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def run_experiment(name: str, output_dir, *flags: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", f"experiments.{name}", "--quick", f"--output_dir={output_dir}",
       *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(output_dir, f"{name}.json")) as f:
    payload = json.load(f)
  assert set(payload) == {"summary", "rows", "config", "env"}
  assert os.path.exists(os.path.join(output_dir, f"{name}.md"))
  assert "|" in result.stdout
  return payload


@pytest.mark.xdist_group("subprocess")
def test_bench_step_quick(tmp_path):
  payload = run_experiment("bench_step", tmp_path)
  summary = payload["summary"]
  assert "overhead_pct" in summary
  # The library step does the hand-written step's work: same FLOPs, memory traffic within 3%
  # (the guard and metrics add about 1 MB of elementwise traffic per step).
  assert abs(summary["flops_ratio"] - 1) < 0.01
  assert abs(summary["bytes_accessed_ratio"] - 1) < 0.03
  total = summary["zero0_bytes_per_device"]
  # ZeRO-1/2 keep 1/8 of the Adam state (2 of 3 float32 copies of the model): 1/3 + 2/3/8.
  for stage in (1, 2):
    assert summary[f"zero{stage}_bytes_per_device"] <= total * (1 / 3 + 2 / 3 / 8) * 1.05
  assert summary["zero3_bytes_per_device"] <= total / 8 * 1.05
  assert payload["env"]["devices"] == 8
