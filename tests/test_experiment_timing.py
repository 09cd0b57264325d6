"""The interleaved timing the experiments' wall-clock ratios rest on."""

import numpy as np

from experiments import common


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
