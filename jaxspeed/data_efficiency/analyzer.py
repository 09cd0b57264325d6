"""Offline data analyzer: per-sample difficulty metrics and a sorted index of them.

DeepSpeed Data Efficiency's map-reduce analyzer (arXiv 2212.03597, §3.1). Map:
the samples are split into ``num_workers`` contiguous shards and each shard's
metric values are computed in its own process. Reduce: the shard values are
joined and sorted, and for each metric ``m`` the output directory gets

  ``m_sample_to_metric.npy``  float64[N]: metric of sample i.
  ``m_index_to_sample.npy``   int64[N]: sample ids sorted by metric (stable).
  ``m_index_to_metric.npy``   float64[N]: the sorted metric values.

plus ``analysis.json`` (N, metric names, percentiles 0..100 of each metric),
written last so that its presence means the analysis is complete.

Built-in metrics (Megatron-DeepSpeed ``analyze_data.py``):
  ``seqlen``: the number of non-pad tokens.
  ``vocab_rarity``: Σ over tokens of −log p(token), a sum rather than a mean, with
    p = count / total from the token counts of the whole corpus.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from fractions import Fraction
from multiprocessing import get_context
from typing import Any

import numpy as np

from jaxspeed.data.loader import TokenWindows

BUILTIN_METRICS = ("seqlen", "vocab_rarity")
METADATA_FILE = "analysis.json"

MetricFn = Callable[[np.ndarray], float]
# A user metric maps one sample to a float; a string names a built-in metric.
MetricSpec = MetricFn | str
Samples = np.ndarray | Sequence[np.ndarray] | TokenWindows

_METRIC_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def seqlen(sample: np.ndarray, pad_id: int | None = None) -> float:
  """Number of tokens of ``sample`` (int[L]) that are not ``pad_id``."""
  if pad_id is None:
    return float(sample.shape[0])
  return float(np.count_nonzero(sample != pad_id))


def vocab_rarity(sample: np.ndarray, neg_log_p: np.ndarray, pad_id: int | None = None) -> float:
  """Σ_tokens −log p(token) of ``sample`` (int[L]); ``neg_log_p``: float64[V]."""
  if pad_id is not None:
    sample = sample[sample != pad_id]
  return float(neg_log_p[sample].sum())


def token_neg_log_probs(counts: np.ndarray) -> np.ndarray:
  """float64[V]: −log(count / total) per token id, from int64[V] corpus counts.

  Zero counts are set to 1 so that every id has a finite value; the total stays
  the true number of tokens, so ids absent from the corpus do not change p.
  """
  total = max(int(counts.sum()), 1)
  return -np.log(np.maximum(counts, 1) / total)


def _shard(samples: np.ndarray | Sequence[np.ndarray], start: int, end: int) -> Any:
  if isinstance(samples, np.ndarray):
    return samples[start:end]
  return [np.asarray(samples[i]) for i in range(start, end)]


def _count_tokens(shard: Sequence[np.ndarray], pad_id: int | None) -> np.ndarray:
  """int64[V_shard]: token id counts of one shard (map step of the counting pass)."""
  counts = np.zeros((0,), np.int64)
  for sample in shard:
    sample = np.asarray(sample).ravel()
    if pad_id is not None:
      sample = sample[sample != pad_id]
    if sample.size and sample.min() < 0:
      raise ValueError(f"token ids must be >= 0, got {sample.min()}")
    c = np.bincount(sample, minlength=counts.shape[0])
    c[: counts.shape[0]] += counts
    counts = c
  return counts


def _sum_counts(parts: Sequence[np.ndarray]) -> np.ndarray:
  """Reduce step of the counting pass: adds shard counts of different lengths."""
  total = np.zeros((max(p.shape[0] for p in parts),), np.int64)
  for p in parts:
    total[: p.shape[0]] += p
  return total


def _metric_values(
    shard: Sequence[np.ndarray],
    metrics: Mapping[str, MetricSpec],
    neg_log_p: np.ndarray | None,
    pad_id: int | None,
) -> dict[str, np.ndarray]:
  """float64[n_shard] per metric for one shard (map step)."""
  out = {name: np.empty((len(shard),), np.float64) for name in metrics}
  for i, sample in enumerate(shard):
    sample = np.asarray(sample)
    for name, spec in metrics.items():
      if spec == "seqlen":
        out[name][i] = seqlen(sample, pad_id)
      elif spec == "vocab_rarity":
        out[name][i] = vocab_rarity(sample, neg_log_p, pad_id)
      else:
        out[name][i] = float(spec(sample))
  return out


def _normalize_metrics(metrics: Mapping[str, MetricSpec] | Sequence[str]) -> dict[str, MetricSpec]:
  if isinstance(metrics, str):
    metrics = [metrics]
  specs = dict(metrics) if isinstance(metrics, Mapping) else {m: m for m in metrics}
  if not specs:
    raise ValueError("no metrics to analyze")
  for name, spec in specs.items():
    if not _METRIC_NAME.match(name):
      raise ValueError(
          f"metric name {name!r} must match {_METRIC_NAME.pattern}: it names the index files")
    if isinstance(spec, str) and spec not in BUILTIN_METRICS:
      raise ValueError(f"unknown built-in metric {spec!r}; built-ins: {', '.join(BUILTIN_METRICS)}")
    if not isinstance(spec, str) and not callable(spec):
      raise ValueError(f"metric {name!r} must be a callable or a built-in name, got {spec!r}")
  return specs


def _run_shards(pool: Executor | None, fn: Callable[..., Any], shards: Sequence[Any],
                *args: Any) -> list[Any]:
  """``fn(shard, *args)`` for every shard, in shard order."""
  if pool is None:
    return [fn(shard, *args) for shard in shards]
  return list(pool.map(fn, shards, *[[a] * len(shards) for a in args]))


def analyze(
    samples: Samples,
    metrics: Mapping[str, MetricSpec] | Sequence[str],
    output_dir: str | os.PathLike[str],
    num_workers: int = 1,
    pad_id: int | None = None,
) -> AnalysisIndex:
  """Computes per-sample metrics, sorts them, and writes the index files.

  Args:
    samples: int[N, L] array, a ``TokenWindows`` (its [N, S + 1] windows) or any
      sequence of 1-D int arrays.
    metrics: built-in metric names, or ``{name: fn or built-in name}`` where
      ``fn(sample: int[L]) -> float``. With ``num_workers > 1`` a ``fn`` must be
      picklable (defined at module level).
    output_dir: created if missing; existing index files are overwritten.
    num_workers: processes of the map step; 1 computes in this process. Workers
      are spawned, so a script must call ``analyze`` under
      ``if __name__ == "__main__":``, and each worker first imports jaxspeed (a
      few seconds): more workers pay off only for large corpora.
    pad_id: token ignored by both built-in metrics and by the vocabulary counts.

  Returns:
    The written index, loaded as memmaps.
  """
  if isinstance(samples, TokenWindows):
    samples = samples.windows
  specs = _normalize_metrics(metrics)
  n = len(samples)
  if n == 0:
    raise ValueError("no samples to analyze")
  if num_workers < 1:
    raise ValueError(f"num_workers must be >= 1, got {num_workers}")
  num_workers = min(num_workers, n)
  if num_workers > 1:
    for name, spec in specs.items():
      try:
        pickle.dumps(spec)
      except Exception as e:
        raise ValueError(f"metric {name!r} cannot be sent to worker processes ({e}); define "
                         "it at module level or use num_workers=1") from e
  bounds = np.linspace(0, n, num_workers + 1).astype(np.int64)
  shards = [_shard(samples, int(a), int(b)) for a, b in itertools.pairwise(bounds)]

  # Spawned, not forked: forking after JAX has started its threads can deadlock.
  pool = (ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"))
          if num_workers > 1 else None)
  try:
    neg_log_p = None
    if "vocab_rarity" in specs.values():
      neg_log_p = token_neg_log_probs(_sum_counts(_run_shards(pool, _count_tokens, shards,
                                                              pad_id)))
    parts = _run_shards(pool, _metric_values, shards, specs, neg_log_p, pad_id)
  finally:
    if pool is not None:
      pool.shutdown()

  os.makedirs(output_dir, exist_ok=True)
  percentiles = {}
  for name in specs:
    values = np.concatenate([p[name] for p in parts])
    if not np.all(np.isfinite(values)):
      bad = int(np.flatnonzero(~np.isfinite(values))[0])
      raise ValueError(f"metric {name!r} is not finite for sample {bad}: {values[bad]}")
    order = np.argsort(values, kind="stable").astype(np.int64)
    np.save(os.path.join(output_dir, f"{name}_sample_to_metric.npy"), values)
    np.save(os.path.join(output_dir, f"{name}_index_to_sample.npy"), order)
    np.save(os.path.join(output_dir, f"{name}_index_to_metric.npy"), values[order])
    percentiles[name] = np.percentile(values, np.arange(101)).tolist()
  metadata = {"num_samples": n, "metrics": list(specs), "percentiles": percentiles,
              "pad_id": pad_id}
  with open(os.path.join(output_dir, METADATA_FILE), "w") as f:
    json.dump(metadata, f, indent=1)
  return AnalysisIndex.load(output_dir)


class AnalysisIndex:
  """The files written by ``analyze``, read through memmaps.

  Attributes:
    directory: the output directory of ``analyze``.
    num_samples: N.
    metrics: metric names, in analysis order.
    percentiles: ``{metric: [101 floats]}``, percentiles 0..100 (linear interpolation).
  """

  def __init__(self, directory: str | os.PathLike[str], metadata: Mapping[str, Any]):
    self.directory = os.fspath(directory)
    self.num_samples = int(metadata["num_samples"])
    self.metrics = tuple(metadata["metrics"])
    self.percentiles = {m: list(v) for m, v in metadata["percentiles"].items()}
    self._arrays: dict[str, np.memmap] = {}

  @classmethod
  def load(cls, directory: str | os.PathLike[str]) -> AnalysisIndex:
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; run data_efficiency.analyze first")
    with open(path) as f:
      return cls(directory, json.load(f))

  def _array(self, metric: str, kind: str) -> np.memmap:
    if metric not in self.metrics:
      raise KeyError(f"metric {metric!r} not analyzed; known: {', '.join(self.metrics)}")
    name = f"{metric}_{kind}"
    if name not in self._arrays:
      self._arrays[name] = np.load(os.path.join(self.directory, f"{name}.npy"), mmap_mode="r")
    return self._arrays[name]

  def values(self, metric: str) -> np.memmap:
    """float64[N]: the metric of every sample, by sample id."""
    return self._array(metric, "sample_to_metric")

  def index_to_sample(self, metric: str) -> np.memmap:
    """int64[N]: sample ids in increasing metric order (ties by sample id)."""
    return self._array(metric, "index_to_sample")

  def index_to_metric(self, metric: str) -> np.memmap:
    """float64[N]: the metric values in increasing order."""
    return self._array(metric, "index_to_metric")

  def samples_up_to(self, metric: str, value: float) -> np.ndarray:
    """int64[k]: the samples with metric <= ``value``, in increasing metric order."""
    k = int(np.searchsorted(self.index_to_metric(metric), value, side="right"))
    return np.array(self.index_to_sample(metric)[:k])

  def samples_in_percentile(self, metric: str, lo: float, hi: float) -> np.ndarray:
    """int64[k]: the samples of metric rank in [lo, hi) percent of N, in metric order.

    Ranks, not values, decide: ``(0, 10)`` is the first ⌊N / 10⌋ samples of the
    sorted index, whatever their ties.
    """
    if not 0 <= lo <= hi <= 100:
      raise ValueError(f"need 0 <= lo <= hi <= 100, got lo={lo}, hi={hi}")
    start, end = (int(Fraction(q) * self.num_samples // 100) for q in (lo, hi))
    return np.array(self.index_to_sample(metric)[start:end])

  def percentile_value(self, metric: str, q: float) -> float:
    """The ``q``-th percentile (0..100, linear interpolation) of the metric."""
    return float(np.percentile(self.index_to_metric(metric), q))
