"""Checkpoints with orbax: save every N steps, keep the last K, resume from the newest.

Orbax writes each step into a temporary directory and renames it into place
only once every process has finished writing, so a process killed mid-save
leaves no directory that ``latest_step`` would pick up.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  """A train state plus the data iterator's JSON state, per step, under ``directory``."""

  def __init__(self, directory: str, keep: int = 3):
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
    """Starts an asynchronous save of ``step``; the next save or ``close`` waits for it."""
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def check(self) -> None:
    """Raises the error of a finished asynchronous save that failed; never waits for one."""
    if not self._manager.is_saving_in_progress():
      self._manager.wait_until_finished()  # returns at once; re-raises a failed save

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores ``step`` into the shardings of ``target`` (ShapeDtypeStructs)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

  def close(self) -> None:
    """Waits for pending saves, then releases resources."""
    self._manager.wait_until_finished()
    self._manager.close()
