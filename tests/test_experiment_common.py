"""Helpers every experiment shares: interleaved timing, and a fresh run that stops on a signal."""

import numpy as np
import pytest

from experiments import common
from jaxspeed.errors import RunError


def test_time_interleaved_alternates_blocks_after_warmup():
  order = []
  calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
  seconds = common.time_interleaved(calls, repeats=2, block=2, warmup=1)
  assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2
  assert {name: s.shape for name, s in seconds.items()} == {"a": (4,), "b": (4,)}


def test_ratio_spread_matches_repeats_pairwise():
  # A load swing that slows both sides alike leaves every matched ratio at 2.
  slow = np.array([2.0, 20.0, 4.0, 2.0])
  fast = np.array([1.0, 10.0, 2.0, 1.0])
  assert common.ratio_spread(slow, fast) == {"median": 2.0, "p25": 2.0, "p75": 2.0}
  spread = common.ratio_spread(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.ones(5))
  assert spread == {"median": 3.0, "p25": 2.0, "p75": 4.0}


def test_fresh_run_stops_the_experiment_when_a_signal_stopped_the_run(monkeypatch, tmp_path):
  stopped = {"preempted": True, "signal": "SIGTERM", "steps_done": 3, "steps": 10}
  monkeypatch.setattr(common.jaxspeed, "train", lambda config, workdir: stopped)
  with pytest.raises(RunError, match="stopped by SIGTERM at step 3; no report"):
    common.fresh_run(None, str(tmp_path / "run"))
