"""Where metrics go: ``metrics.jsonl``, TensorBoard, the terminal, and a loss plot.

Only process 0 writes; other processes get a writer that does nothing, so the
training loop never branches on the process index.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import tqdm
from matplotlib.figure import Figure

from jaxspeed.checkpoint import write_atomic


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard.

  Records past ``start_step`` (logged by an earlier run after its last
  checkpoint) are dropped first (TensorBoard: purged), so a resumed run logs each
  step once.
  """

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    truncate_metrics(self.path, start_step)
    self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())
    # tensorboardX imports torch when installed: pay for it only where it is used.
    from tensorboardX import SummaryWriter

    # On a resume, TensorBoard hides the earlier run's events past the checkpoint, as
    # ``truncate_metrics`` drops its records.
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                             purge_step=start_step + 1 if start_step else None)
    self._bar = None
    if sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True)

  def write(self, step: int, metrics: Mapping[str, float | list[float]]) -> None:
    """Writes scalars, and lists (e.g. per-expert token counts) to the JSON file only."""
    if not self.enabled:
      return
    record = {"step": step, **{k: v if isinstance(v, list) else float(v)
                               for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    scalars = {k: v for k, v in record.items() if k != "step" and not isinstance(v, list)}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    if self._bar is not None:
      self._bar.set_postfix_str(text, refresh=False)
    else:
      print(f"step {step}: {text}", flush=True)

  def advance(self, steps: int = 1) -> None:
    if self.enabled and self._bar is not None:
      self._bar.update(steps)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.close()
    self._file.close()


def truncate_metrics(path: str, step: int) -> None:
  """Drops the records of ``path`` past ``step`` and any torn last line, atomically."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut short by a kill
      if isinstance(record, dict) and record.get("step", 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
  write_atomic(path, "".join(kept))


def read_metrics(path: str) -> list[dict[str, float]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_loss(records: list[dict[str, float]], path: str) -> None:
  """Train (and validation, where logged) loss against step, as a PNG."""
  # A bare Figure, not pyplot: no global backend switch, so notebooks keep inline plots.
  fig = Figure(figsize=(6, 4))
  ax = fig.subplots()
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
  if train:
    ax.plot(*zip(*train), label="train")
  if val:
    ax.plot(*zip(*val), "o-", label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def plot_runs(runs: Mapping[str, list[dict[str, float]]], path: str, key: str = "loss",
              x: str = "step") -> None:
  """One curve of ``key`` against ``x`` per run (label -> metric records), as a PNG."""
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for label, records in runs.items():
    points = [(r[x], r[key]) for r in records if key in r and x in r]
    if points:
      ax.plot(*zip(*points), label=label)
  ax.set_xlabel(x)
  ax.set_ylabel(key)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
