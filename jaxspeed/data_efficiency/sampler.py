"""Curriculum data sampler over an analyzer index (DeepSpeed Data Efficiency, arXiv 2212.03597).

Per global batch (curriculum step t += 1):
  1. Every metric's difficulty becomes ``schedule.difficulty_at(t)``.
  2. If any difficulty changed, a new cluster is made of the samples eligible for
     every metric (value type: metric <= d; percentile type: in the lowest d
     percent), minus the samples of earlier clusters, so clusters are disjoint and
     together hold every sample eligible so far. It is shuffled.
  3. Each of the B slots picks a cluster with probability proportional to its size
     (with replacement); each chosen cluster yields its next samples in order and
     is reshuffled when it runs out; the batch is then shuffled.

Easy clusters keep being sampled after harder ones appear.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from jaxspeed.data_efficiency.curriculum import CONFIG_KEY, CurriculumSchedule
from jaxspeed.errors import ConfigError

DIFFICULTY_TYPES = ("value", "percentile")


class MetricIndex(Protocol):
  """What the sampler reads of an ``AnalysisIndex``."""

  num_samples: int

  def samples_up_to(self, metric: str, value: float) -> np.ndarray: ...

  def samples_in_percentile(self, metric: str, lo: float, hi: float) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class MetricCurriculum:
  """One curriculum metric: its schedule and how a difficulty selects samples.

  Attributes:
    schedule: difficulty per curriculum step.
    difficulty_type: "value" (metric <= difficulty) or "percentile" (metric rank
      in the lowest ``difficulty`` percent).
  """

  schedule: CurriculumSchedule
  difficulty_type: str = "value"

  def validate(self, key: str) -> None:
    self.schedule.validate(key)
    if self.difficulty_type not in DIFFICULTY_TYPES:
      raise ConfigError(f"{key}.difficulty_type",
                        f"got {self.difficulty_type!r}; allowed values: "
                        f"{', '.join(DIFFICULTY_TYPES)}")
    if self.difficulty_type == "percentile":
      for name in ("min_difficulty", "max_difficulty"):
        value = getattr(self.schedule, name)
        if not 0 <= value <= 100:
          raise ConfigError(f"{key}.{name}", f"a percentile must lie in [0, 100], got {value}")


class CurriculumSampler:
  """Draws the sample ids of each global batch, easiest clusters first.

  Unlike DeepSpeed's sampler, which saved the *global* ``np.random`` state in its
  checkpoint (DeepSpeed PRs #8406/#8425), this sampler draws from its OWN
  ``np.random.Generator`` and checkpoints that generator's state, so a run resumed
  from ``state()`` draws exactly the batches the uninterrupted run would have.
  A small cluster never leaves slots empty (cf. DeepSpeed PR #8520): it is read
  cyclically, reshuffled on every wrap; a new cluster that would be empty is
  skipped.

  The ids are global; with several data-parallel processes each takes its own
  slice of ``next_indices()``.

  Args:
    index: the analyzer index holding every metric named in ``metrics``.
    metrics: ``{metric name: MetricCurriculum}``.
    global_batch_size: B, samples per global batch.
    seed: seeds the sampler's generator.
  """

  def __init__(self, index: MetricIndex, metrics: Mapping[str, MetricCurriculum],
               global_batch_size: int, seed: int):
    if not metrics:
      raise ConfigError(f"{CONFIG_KEY}.metric", "needs at least one metric")
    # The config holds one metric's schedule, so every metric's fields are named there.
    for metric in metrics.values():
      metric.validate(CONFIG_KEY)
    if global_batch_size < 1:
      raise ConfigError("batch_size", f"must be >= 1, got {global_batch_size}")
    self.index = index
    self.metrics = dict(metrics)
    self.global_batch_size = global_batch_size
    self.curriculum_step = 0
    self.difficulties: dict[str, int | None] = dict.fromkeys(self.metrics)
    self.clusters: list[np.ndarray] = []  # int64[cluster size] each, in read order
    self.positions: list[int] = []  # next read position in each cluster
    self._clustered = np.zeros((index.num_samples,), bool)  # union of the clusters
    self._rng = np.random.default_rng(seed)

  def _eligible(self) -> np.ndarray:
    """bool[N]: samples within the current difficulty of every metric."""
    eligible = np.ones((self.index.num_samples,), bool)
    for name, metric in self.metrics.items():
      d = self.difficulties[name]
      if metric.difficulty_type == "value":
        ids = self.index.samples_up_to(name, d)
      else:
        ids = self.index.samples_in_percentile(name, 0, min(max(d, 0), 100))
      within = np.zeros_like(eligible)
      within[ids] = True
      eligible &= within
    return eligible

  def _update_clusters(self) -> None:
    new = {name: m.schedule.difficulty_at(self.curriculum_step) for name, m in self.metrics.items()}
    if new == self.difficulties:
      return
    self.difficulties = new
    cluster = np.flatnonzero(self._eligible() & ~self._clustered).astype(np.int64)
    if cluster.size:
      self.clusters.append(self._rng.permutation(cluster))
      self.positions.append(0)
      self._clustered[cluster] = True

  def _read(self, c: int, count: int) -> np.ndarray:
    """The next ``count`` ids of cluster ``c``, reshuffling it whenever it runs out."""
    out = []
    while count:
      if self.positions[c] == self.clusters[c].size:
        self.clusters[c] = self._rng.permutation(self.clusters[c])
        self.positions[c] = 0
      take = min(count, self.clusters[c].size - self.positions[c])
      out.append(self.clusters[c][self.positions[c]:self.positions[c] + take])
      self.positions[c] += take
      count -= take
    return np.concatenate(out) if out else np.zeros((0,), np.int64)

  def next_indices(self) -> np.ndarray:
    """int64[B]: the sample ids of the next global batch; advances the curriculum step."""
    self.curriculum_step += 1
    self._update_clusters()
    if not self.clusters:
      raise ValueError(
          f"no sample is eligible at curriculum step {self.curriculum_step} with difficulties "
          f"{self.difficulties}; raise min_difficulty")
    sizes = np.array([c.size for c in self.clusters], np.float64)
    picks = self._rng.choice(len(self.clusters), size=self.global_batch_size,
                             p=sizes / sizes.sum())
    counts = np.bincount(picks, minlength=len(self.clusters))
    batch = np.concatenate([self._read(c, int(k)) for c, k in enumerate(counts)])
    return self._rng.permutation(batch)

  def state(self) -> dict[str, Any]:
    """JSON-able state (plain ints and lists); ``restore`` resumes from it exactly."""
    return {
        "curriculum_step": self.curriculum_step,
        "difficulties": dict(self.difficulties),
        "clusters": [c.tolist() for c in self.clusters],
        "positions": list(self.positions),
        "rng": self._rng.bit_generator.state,
    }

  def restore(self, state: Mapping[str, Any]) -> None:
    """Resumes from ``state()`` of a sampler built with the same index and metrics."""
    if set(state["difficulties"]) != set(self.metrics):
      raise ValueError(f"state is for metrics {sorted(state['difficulties'])}, this sampler "
                       f"has {sorted(self.metrics)}")
    if len(state["clusters"]) != len(state["positions"]):
      raise ValueError("state has a different number of clusters and read positions")
    self.curriculum_step = int(state["curriculum_step"])
    self.difficulties = {name: None if d is None else int(d)
                         for name, d in state["difficulties"].items()}
    self.clusters = [np.asarray(c, np.int64).reshape(-1) for c in state["clusters"]]
    self.positions = [int(p) for p in state["positions"]]
    self._clustered = np.zeros((self.index.num_samples,), bool)
    for c in self.clusters:
      self._clustered[c] = True
    self._rng.bit_generator.state = _plain(state["rng"])


def _plain(value: Any) -> Any:
  """Nested dicts with numpy scalars (e.g. from ``np.load``) -> Python dicts and ints."""
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.generic):
    return value.item()
  return value
