"""``experiments.bench_vs_torch --quick`` runs and reports its headline keys.

Nothing here asserts a wall-clock figure (the suite never does): the run is a smoke test
of the benchmark's plumbing, with PyTorch if it is installed and without it
otherwise.
"""

import importlib.util

import pytest
from helpers import run_experiment_subprocess

HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.slow
def test_bench_vs_torch_quick(tmp_path):
  # Its own process: the benchmark picks its own device count and XLA flags.
  payload = run_experiment_subprocess("bench_vs_torch", tmp_path)
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
