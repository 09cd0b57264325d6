"""Preemption: SIGTERM or SIGINT stops a run at a step boundary, saved, instead of killing it.

The first signal only sets a flag; the loop sees it at the next step boundary,
saves a checkpoint, waits for it to commit and returns (as MaxText's
autocheckpoint does on a preemption notice). A second signal ends the process
at once with the signal's default action (exit status 128 + signal).

With several processes every one must stop after the same step, or the ones
still training wait forever in a collective. JAX has a sync point for this
(``multihost_utils.reached_preemption_sync_point``, which works on CPU with
``jax.distributed``), but it learns of a preemption only through a SIGTERM
handler of its own in C: the Python handler installed here replaces it, it
never hears of SIGINT, and with it a second SIGTERM could not end the process.
So the processes agree through a one-element-per-flag max all-reduce instead,
launched at each step boundary right after the step and read one boundary
later: every process reads the same value at the same step, and the read waits
only for a step that has already been waited for.

The same all-reduce carries a second flag, "an asynchronous checkpoint save
failed on this process", for the same reason: a process that stopped alone
would leave the others waiting. The trainer stops every process at the
boundary where they agree on it, with the error message of the first process
whose save failed (``first_message``). Before the next save, and at the end,
the trainer waits for the pending save through ``any_process`` instead of
orbax: orbax would wait at a barrier for the failed process until its
timeout (10 minutes).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_MESSAGE_BYTES = 1024  # of an error message shared by ``first_message``


class Agreed(NamedTuple):
  """What every process agreed at a step boundary."""
  preempted: bool  # some process received SIGTERM or SIGINT: save and stop
  save_failed: bool  # some process's asynchronous checkpoint save failed: stop with its error


class Preemption:
  """A context manager that turns SIGTERM/SIGINT into ``at_boundary().preempted``.

  The handlers are installed only while the context is open, and only from
  the main thread (Python allows no other); the previous handlers are put
  back on exit, so a notebook's Ctrl-C works as before after ``train``.

  With several processes the agreement runs on all of ``jax.devices()``.
  """

  def __init__(self):
    self.signal: signal.Signals | None = None  # the first signal received
    self._previous: dict[int, Any] = {}
    self._pending: jax.Array | None = None  # the flags all-reduced at the previous boundary
    self._max = None
    self._mesh: Mesh | None = None

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    if self.signal is not None:  # the second signal: end now, as if no handler were installed
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signal = signal.Signals(signum)

  def at_boundary(self, save_failed: bool = False) -> Agreed:
    """The flags all processes agree on at this step boundary; call once per boundary on each.

    Args:
      save_failed: this process's asynchronous checkpoint save failed.

    With one process: this process's flags, at once. With several: the same on
    all of them at the same boundary, one boundary after the first process
    raised a flag.
    """
    local = [self.signal is not None, save_failed]
    if jax.process_count() == 1:
      return Agreed(*local)
    agreed = Agreed(False, False)
    if self._pending is not None:
      agreed = Agreed(*(bool(f) for f in np.asarray(self._pending)))
    if not any(agreed):
      self._pending = self._all_reduce(local)
    return agreed

  def any_process(self, flags: Sequence[bool]) -> tuple[bool, ...]:
    """Each flag or-ed over all processes, now (a blocking all-reduce); every process must call."""
    if jax.process_count() == 1:
      return tuple(flags)
    return tuple(bool(f) for f in np.asarray(self._all_reduce(flags)))

  def _all_reduce(self, flags: Sequence[bool]) -> jax.Array:
    """int32 [flags]: the max of each flag over all processes, launched, not waited for."""
    if self._max is None:
      self._mesh = Mesh(np.array(jax.devices()), ("all",))
      self._max = jax.jit(lambda flags: jnp.max(flags, axis=0),
                          out_shardings=NamedSharding(self._mesh, P()))
    return self._max(self._flags(np.array(flags, np.int32)))

  def _flags(self, local: np.ndarray) -> jax.Array:
    """int32 [devices, flags]: this process's flags on each of its devices, one array over all."""
    devices = self._mesh.devices
    sharding = NamedSharding(self._mesh, P("all"))
    shards = [jax.device_put(local[None], d) for d in devices
              if d.process_index == jax.process_index()]
    return jax.make_array_from_single_device_arrays((len(devices), len(local)), sharding, shards)


def first_message(message: str | None) -> str | None:
  """The ``message`` of the lowest-numbered process that has one; every process must call.

  One all-gather of a fixed-size byte buffer per process (a message is cut
  at 1 KiB); with one process, ``message`` itself.
  """
  if jax.process_count() == 1:
    return message
  raw = (message or "").encode()[:_MESSAGE_BYTES]
  local = np.zeros(1 + _MESSAGE_BYTES, np.uint8)
  local[0] = message is not None
  local[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
  for row in np.asarray(multihost_utils.process_allgather(local)):  # [processes, 1 + bytes]
    if row[0]:
      return bytes(row[1:]).rstrip(b"\0").decode(errors="replace")
  return None
