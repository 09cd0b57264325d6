"""Shared flags and output for experiment apps (the convention in experiments/README.md).

Importing this module defines ``--cpu_devices`` and ``--output_dir``.
``setup_devices()`` must run at the start of ``main``, before JAX touches a
device.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Hashable
from typing import Any, NoReturn

import jax
import numpy as np
from absl import app, flags

import jaxspeed
from jaxspeed.configs import gpt_tiny
from jaxspeed.data_efficiency.sources import schedule_from_config
from jaxspeed.errors import ConfigError, FlagError, RunError
from jaxspeed.parallel import use_cpu_devices
from jaxspeed.training import read_metrics

CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 8, "Virtual CPU devices to create (ignored on GPU/TPU).", lower_bound=1)
OUTPUT_DIR = flags.DEFINE_string("output_dir", "results", "Where results are written.")


def setup_devices(num: int | None = None) -> None:
  """Creates ``--cpu_devices`` virtual CPU devices.

  Only the CPU backend reads this setting, so on GPU/TPU the real devices are
  used and the flag is ignored.
  """
  use_cpu_devices(num or CPU_DEVICES.value)


def run_app(main: Callable[[list[str]], None]) -> None:
  """``app.run(main)``, turning every user mistake and stopped run into one line on stderr.

  Exit code 2 for bad input: an unknown ``--config.*`` key, a flag that does
  not parse (a missing ``--config`` file, ``--cpu_devices=0``), a
  ``ConfigError`` or ``FlagError`` from ``main``. Exit code 1 for a
  ``RunError`` (the run diverged, a checkpoint failed to save).
  """
  from jaxspeed.config import check_override_keys

  try:
    check_override_keys(sys.argv[1:])
  except ConfigError as e:
    _fail(e, 2)
  app.run(_one_line_errors(main), flags_parser=_parse_flags)


def _fail(error: Exception, code: int) -> NoReturn:
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(e, 2)
  except OSError as e:  # ml_collections loads the --config file while parsing its overrides
    _fail(_config_file_error(e), 2)


def _config_file_error(error: OSError) -> FlagError:
  reason = str(error).strip().splitlines()[-1].strip()
  return FlagError("config", f"cannot load the config file: {reason}")


def config_value(holder: flags.FlagHolder):
  """The config of a ``config_flags`` holder; a file that failed to load is a ``FlagError``."""
  try:
    config = holder.value
    config.keys()  # ml_collections defers a load failure to the first attribute access
  except OSError as e:
    raise _config_file_error(e) from e
  return config


def _one_line_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  @functools.wraps(main)
  def run(argv: list[str]) -> None:
    try:
      return main(argv)
    except (ConfigError, FlagError) as e:
      _fail(e, 2)
    except RunError as e:
      _fail(e, 1)

  return run


def env_info() -> dict[str, Any]:
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": jax.device_count(), "processes": jax.process_count()}


def markdown_table(rows: list[dict[str, Any]]) -> str:
  """Rows as a markdown table: every key of any row, in order of appearance; "" where a
  row lacks one."""
  if not rows:
    return ""
  keys = list(dict.fromkeys(k for r in rows for k in r))
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) if k in r else "" for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def write_results(name: str, summary: dict[str, Any], rows: list[dict[str, Any]],
                  config: dict[str, Any], header: str = "") -> str:
  """Writes ``<output_dir>/<name>.json`` and ``.md``; prints and returns the markdown."""
  os.makedirs(OUTPUT_DIR.value, exist_ok=True)
  payload = {"summary": summary, "rows": rows, "config": config, "env": env_info()}
  with open(os.path.join(OUTPUT_DIR.value, f"{name}.json"), "w") as f:
    json.dump(payload, f, indent=2, default=str)
  text = "\n\n".join(part for part in (f"# {name}", header, markdown_table(rows),
                                        markdown_table([summary])) if part)
  with open(os.path.join(OUTPUT_DIR.value, f"{name}.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  return text


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int, block: int = 1,
                     warmup: int = 1) -> dict[str, np.ndarray]:
  """Seconds of each call, the calls run in alternating blocks (A A B B A A B B ...).

  Every call should block until its result is ready. Interleaving makes a ratio of two
  calls' times robust to the machine's load drifting during the run: both sides see the
  same load, block by block (``ratio_spread`` reads the ratio from matched repeats).

  Returns:
    name -> [repeats * block] seconds, in the order the calls ran.
  """
  for call in calls.values():
    for _ in range(warmup):  # compiles and warms caches outside the timed blocks
      call()
  seconds = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      for _ in range(block):
        start = time.perf_counter()
        call()
        seconds[name].append(time.perf_counter() - start)
  return {name: np.asarray(s) for name, s in seconds.items()}


def ratio_spread(numerator: np.ndarray, denominator: np.ndarray) -> dict[str, float]:
  """The ratio of two ``time_interleaved`` series: median of the matched ratios and its spread.

  Returns:
    ``median`` of numerator[i] / denominator[i] over matched timings and its 25th and
    75th percentiles ``p25``/``p75``: a load swing shows as a wide spread, not a shifted
    median.
  """
  ratios = np.asarray(numerator) / np.asarray(denominator)
  p25, median, p75 = np.percentile(ratios, [25, 50, 75])
  return {"median": float(median), "p25": float(p25), "p75": float(p75)}


def first_reach(points: list[tuple[float, float]], target: float) -> float:
  """The x at which (x, loss) points first reach ``target``, interpolated; NaN if never."""
  for (x0, v0), (x1, v1) in itertools.pairwise(points):
    if math.isfinite(v1) and v1 <= target:
      if not math.isfinite(v0) or v0 <= target or v0 == v1:
        return float(x1)
      return x0 + (v0 - target) / (v0 - v1) * (x1 - x0)
  return math.nan


def fresh_run(config, workdir: str) -> tuple[dict[str, Any], list[dict[str, float]]]:
  """Trains ``config`` in an emptied ``workdir`` (never a resume of an older run).

  Raises ``RunError`` if a signal stopped the run (it saved a checkpoint and returned).

  Returns:
    (the run summary, the logged metric records).
  """
  shutil.rmtree(workdir, ignore_errors=True)
  summary = jaxspeed.train(config, workdir)
  if summary.get("preempted"):  # a signal stopped it: the experiment stops too, reporting nothing
    raise RunError(f"the run in {workdir} was stopped by {summary['signal']} at step "
                   f"{summary['steps_done']}; no report was written")
  return summary, read_metrics(os.path.join(workdir, "metrics.jsonl"))


def run_tokens(config) -> int:
  """Tokens a run of ``config`` sees: batch x the scheduled (truncated) length of each step."""
  seqlen = config.data_efficiency.seqlen
  if not seqlen.enabled:
    return config.steps * config.batch_size * config.seq_len
  schedule = schedule_from_config(seqlen, "data_efficiency.seqlen")
  # Global batch t (0-based) is cut to difficulty_at(t + 1), as in SeqlenCurriculum.
  return sum(config.batch_size * min(schedule.difficulty_at(t + 1), config.seq_len)
             for t in range(config.steps))


def clean_step_seconds(records: list[dict], eval_every: int,
                       kind_at: Callable[[int], Hashable] = lambda step: 0
                       ) -> dict[Hashable, list[float]]:
  """Kind -> wall seconds of its clean steps, from records logged every step.

  A clean step is neither the first of its kind (which compiles) nor right
  after an evaluation. ``kind_at(t)`` is the kind of 1-based step t.
  """
  elapsed = {int(r["step"]): r["elapsed_s"] for r in records}
  seen, times = set(), collections.defaultdict(list)
  for t in sorted(elapsed):
    kind = kind_at(t)
    first = kind not in seen
    seen.add(kind)
    if first or t - 1 not in elapsed or (t - 1) % eval_every == 0:
      continue
    times[kind].append(elapsed[t] - elapsed[t - 1])
  return times


def small_moe_gpt(quick: bool, steps: int, layers: int):
  """The GPT of ``configs/gpt_tiny.py`` the MoE reproductions train on one device's data axis:
  ``layers`` layers, top-1 gate, ``steps`` steps with a tenth of warm-up, evaluated and
  checkpointed at the end; d_model 64 and sequences of 64 (32 and 32 with ``quick``)."""
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1, expert=1)
  config.zero.stage = 0
  config.sample_tokens = 0
  config.steps = steps
  config.log_every = max(1, steps // 4)
  config.eval_every = config.checkpoint_every = steps
  config.optim.warmup = max(1, steps // 10)
  config.model.num_layers = layers
  config.moe.top_k = 1
  if quick:
    config.model.update(d_model=32, d_ff=64, num_heads=2)
    config.seq_len = config.model.max_seq_len = 32
    config.eval_batches = 2
  else:
    config.model.update(d_model=64, d_ff=256)
    config.seq_len = config.model.max_seq_len = 64
  return config
