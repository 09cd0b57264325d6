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
So the processes agree through a one-element max all-reduce of their flags
instead, launched at each step boundary right after the step and read one
boundary later: every process reads the same value at the same step, and the
read waits only for a step that has already been waited for.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
  """A context manager that turns SIGTERM/SIGINT into ``stop_now() == True``.

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

  def stop_now(self) -> bool:
    """Whether the run stops at this step boundary; call once per boundary on every process.

    With several processes: True on all of them at the same boundary, one
    boundary after the first of them received a signal.
    """
    local = self.signal is not None
    if jax.process_count() == 1:
      return local
    if self._max is None:
      self._mesh = Mesh(np.array(jax.devices()), ("all",))
      self._max = jax.jit(jnp.max, out_shardings=NamedSharding(self._mesh, P()))
    stop = self._pending is not None and bool(self._pending)
    if not stop:
      self._pending = self._max(self._flags(local))
    return stop

  def _flags(self, local: bool) -> jax.Array:
    """int32 [devices]: this process's flag on each of its devices, one array over all."""
    devices = self._mesh.devices
    sharding = NamedSharding(self._mesh, P("all"))
    flag = np.array([int(local)], np.int32)
    shards = [jax.device_put(flag, d) for d in devices if d.process_index == jax.process_index()]
    return jax.make_array_from_single_device_arrays((len(devices),), sharding, shards)
