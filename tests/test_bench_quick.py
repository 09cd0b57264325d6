"""``experiments.bench_vs_torch --quick`` runs and reports its headline keys.

Nothing here asserts a wall-clock figure (DESIGN.md): the run is a smoke test
of the benchmark's plumbing, with PyTorch if it is installed and without it
otherwise.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.xdist_group("subprocess")
def test_bench_vs_torch_quick(tmp_path):
  # The benchmark picks its own device count and XLA flags; the 8 virtual
  # devices conftest.py puts in XLA_FLAGS must not leak into it.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_vs_torch", "--quick",
       f"--output_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "bench_vs_torch.json") as f:
    payload = json.load(f)
  assert set(payload) == {"summary", "rows", "config", "env"}
  assert (tmp_path / "bench_vs_torch.md").exists()

  summary = payload["summary"]
  for key in ("speedup_vs_torch", "jaxspeed_tokens_per_s", "torch_tokens_per_s"):
    assert key in summary
  assert summary["jaxspeed_tokens_per_s"] > 0
  sides = {row["side"] for row in payload["rows"]}
  assert "jaxspeed[single]" in sides
  if HAS_TORCH:
    assert "torch" in sides
    assert summary["torch_tokens_per_s"] > 0 and summary["speedup_vs_torch"] > 0
    # Same weights, same batches, same optimizer: both sides see the same first loss.
    rows = {row["side"]: row for row in payload["rows"]}
    assert rows["torch"]["first_loss"] == pytest.approx(rows["jaxspeed[single]"]["first_loss"],
                                                        rel=1e-4)
  else:
    assert summary["speedup_vs_torch"] is None
