"""A run directory's files: checkpoints (orbax) and the config the run trained with.

Orbax writes each step into a temporary directory and renames it into place
only once every process has finished writing, so a process killed mid-save
leaves no directory that ``latest_step`` would pick up.

A checkpoint restores into any layout of the same model and optimizer: when
the saved leaves' shapes differ from the requested ones (a pipeline added or
removed, another stage count, another number of 1-bit workers), the state is
read as host arrays and converted by the rules of ``jaxspeed.checkpoint.layout``.

Layout of a run directory ``workdir``::

  workdir/config.json      the training config (``save_run_config``)
  workdir/checkpoints/<N>  the train state and data-iterator state after step N
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxspeed.checkpoint.layout import convert, flatten_with_paths, place
from jaxspeed.errors import ConfigError, FlagError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  """Where a run in ``workdir`` keeps its checkpoints."""
  return os.path.join(workdir, CHECKPOINTS)


def has_checkpoint(workdir: str) -> bool:
  """Whether the run in ``workdir`` has a finished checkpoint (without opening orbax)."""
  directory = checkpoint_dir(workdir)
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


class _Recorded:
  """An orbax commit future that keeps the error it raises in ``errors``."""

  def __init__(self, inner: Any, errors: list[BaseException]):
    self._inner, self._errors = inner, errors

  def result(self, timeout: float | None = None) -> Any:
    try:
      return self._inner.result(timeout=timeout)
    except BaseException as e:
      self._errors.append(e)
      raise

  def cancel(self) -> Any:
    return self._inner.cancel()


def _recording(handler_type: type, errors: list[BaseException]) -> Any:
  """A ``handler_type`` whose asynchronous writes keep their errors in ``errors``.

  The instance's ``async_save`` is wrapped, not subclassed: orbax finds a
  handler's argument types by its exact class.
  """
  handler = handler_type()
  save = handler.async_save

  async def async_save(*args, **kwargs):
    return [_Recorded(f, errors) for f in await save(*args, **kwargs) or []]

  handler.async_save = async_save
  return handler


class Checkpointer:
  """A train state plus the data iterator's JSON state, per step, under ``directory``."""

  def __init__(self, directory: str, keep: int = 3):
    # This process's failed writes, as soon as orbax's background thread sees them. With
    # several processes orbax itself reports them only after a barrier the failed process
    # never reaches, i.e. at its timeout (10 minutes).
    self._write_errors: list[BaseException] = []
    self._reported = False  # check() raised one of them
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={
            "state": _recording(ocp.StandardCheckpointHandler, self._write_errors),
            "data": _recording(ocp.JsonCheckpointHandler, self._write_errors)})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts an asynchronous save of ``step``; the next save or ``close`` waits for it."""
    # Orbax opens a save with a barrier that is itself a device collective across processes;
    # run alongside a still-running train step, the two programs' collectives could meet in
    # different orders on different processes and wait forever.
    jax.block_until_ready(state)
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def saving(self) -> bool:
    """Whether an asynchronous save is still running (on this process, as orbax sees it)."""
    return self._manager.is_saving_in_progress()

  def check(self) -> None:
    """Raises the error of an asynchronous save that failed on this process; never waits."""
    if self._write_errors:
      self._reported = True
      raise self._write_errors[0]
    if not self._manager.is_saving_in_progress():
      self._manager.wait_until_finished()  # returns at once; re-raises a failed save

  def saved_leaves(self, step: int) -> dict[tuple[str, ...], Any]:
    """The saved state's leaves by path: orbax metadata with ``shape`` and ``dtype``."""
    return flatten_with_paths(self._manager.item_metadata(step)["state"])

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores ``step`` into the shardings of ``target`` (ShapeDtypeStructs).

    A state saved under another layout is converted (``jaxspeed.checkpoint.layout``).

    Raises:
      LayoutError: the saved state does not convert into ``target`` (another model or
        optimizer), naming the first leaf that differs.
    """
    saved = self.saved_leaves(step)
    wanted = flatten_with_paths(target)
    if saved.keys() != wanted.keys() or any(tuple(saved[k].shape) != tuple(w.shape)
                                            for k, w in wanted.items()):
      leaves, data = self.restore_host(step)
      return place(convert(leaves, wanted), target), data
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def restore_host(self, step: int) -> tuple[dict[tuple[str, ...], np.ndarray], dict[str, Any]]:
    """(the state's leaves by path as host arrays, in the saved layout; the data state)."""
    host = jax.tree.map(lambda m: np.empty(m.shape, m.dtype),
                        self._manager.item_metadata(step)["state"])
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(host), data=ocp.args.JsonRestore()))
    return flatten_with_paths(restored["state"]), restored["data"]

  def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data state) of the newest step, restored as ``restore`` does; None if none."""
    step = self.latest_step()
    if step is None:
      return None
    return (step, *self.restore(step, target))

  def close(self) -> None:
    """Waits for pending saves, then releases resources.

    Raises a failed save's error, unless ``check`` already did.
    """
    try:
      self._manager.wait_until_finished()
    except Exception:
      if not self._reported:
        raise
    self._manager.close()


def restore_latest(workdir: str, target: Any, key: str = "workdir") -> Any:
  """The train state of the newest checkpoint of the run in ``workdir``.

  Args:
    target: the abstract train state (ShapeDtypeStructs with shardings).
    key: the config key that named ``workdir``, for the error.

  Raises:
    ConfigError: naming ``key`` if the run has no checkpoint.
  """
  directory = checkpoint_dir(workdir)
  checkpointer = Checkpointer(directory)
  try:
    restored = checkpointer.restore_latest(target)
  finally:
    checkpointer.close()
  if restored is None:
    raise ConfigError(key, f"no checkpoint in {directory}")
  return restored[1]


def write_atomic(path: str, text: str) -> None:
  """Replaces the file ``path`` with ``text`` in one step: a kill leaves the old or the new."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the training config into ``workdir``, for ``load_run_config``."""
  os.makedirs(workdir, exist_ok=True)
  write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2))


def load_run_config(workdir: str, defaults: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` trained with; ``defaults`` fills keys it lacks.

  The saved ``inference`` section is dropped: generation settings come from the caller.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError("workdir", f"{path} not found; train with experiments.train first")
  with open(path) as f:
    saved = json.load(f)
  saved.pop("inference", None)
  return config_from_saved(saved, defaults)


def config_from_saved(saved: dict[str, Any], defaults: ml_collections.ConfigDict
                      ) -> ml_collections.ConfigDict:
  """A copy of ``defaults`` updated with a saved (nested JSON) config.

  Saved keys that ``defaults`` lacks (a schema change since the run) are ignored.
  """
  config = defaults.copy_and_resolve_references()
  known = flatten(json.loads(config.to_json()))
  config.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                     for k, v in flatten(saved).items() if k in known})
  return config


def saved_run_config(workdir: str) -> dict[str, Any] | None:
  """The flattened config the run in ``workdir`` was started with, or None if none is saved.

  Raises:
    FlagError: the saved file cannot be read.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return flatten(json.load(f))
  except (OSError, ValueError) as e:
    raise FlagError("workdir", f"{path} is unreadable ({e}); delete it to resume with the "
                    "config given") from e


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a nested JSON config keyed by dotted paths."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
