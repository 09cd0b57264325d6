r"""Runs a multi-process job on this machine: N processes, one JAX runtime.

  python -m experiments.launch_local --num_processes=2 -- \
      --config=configs/gpt_tiny.py --workdir=results/mp --config.steps=20

starts N copies of ``python -m <module> <args after -->`` with
``--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i
--cpu_devices=<total_cpu_devices / N>`` appended. Together they form one
mesh of ``total_cpu_devices`` CPU devices through ``jax.distributed`` (gloo
collectives), exactly as separate hosts would: this is a stand-in for a
cluster scheduler, not a protocol of its own.

Every process writes ``<logs_dir>/process_<i>.log`` (``--logs_dir``, else the
job's ``--workdir``); process 0's output also goes to this terminal.

When a process fails, the launcher stops the others (their errors are only
echoes of the first one), prints one line naming the failure and the failing
process's last lines, and exits with its code (128 + N for signal N, as shells
do). When ``--timeout_s`` passes, it says which processes hung, stops them and
exits 124. Stopping is SIGTERM to each process's group, then SIGKILL after a
grace period: a process blocked in a collective may never act on SIGTERM.

Preemption: the first SIGTERM or SIGINT to the launcher (a scheduler's notice,
or Ctrl-C) goes on to every process, as a scheduler would deliver it to each
host. A training process then saves at its next step boundary and exits 0
(``jaxspeed.training.preemption``); when all have, the launcher says the job
was preempted and saved, and exits 0. A process still running
``--preemption_grace_s`` later is SIGKILLed, and the launcher says so and exits
128 + the signal; a process that fails instead is reported as above. A second
signal (or SIGHUP) SIGKILLs every process at once and exits 128 + that signal.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

NUM_PROCESSES = flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1)
TOTAL_CPU_DEVICES = flags.DEFINE_integer(
    "total_cpu_devices", 8, "Virtual CPU devices over all processes; divisible by "
    "--num_processes.", lower_bound=1)
MODULE = flags.DEFINE_string("module", "experiments.train", "Module each process runs (-m).")
TIMEOUT_S = flags.DEFINE_float("timeout_s", 1800.0, "Stop everything after this many seconds.")
PORT = flags.DEFINE_integer("port", 0, "Coordinator port; 0 picks a free one.")
LOGS_DIR = flags.DEFINE_string("logs_dir", None,
                              "Where process_<i>.log go; default the job's --workdir.")
PREEMPTION_GRACE_S = flags.DEFINE_float(
    "preemption_grace_s", 120.0, "After SIGTERM/SIGINT to the launcher, how long the processes "
    "have to save and exit before they are SIGKILLed.", lower_bound=0.0)

# Flags the launcher sets on every process; passing them after `--` is a mistake.
_OWNED_FLAGS = ("coordinator_address", "num_processes", "process_id", "cpu_devices")
_GRACE_S = 5.0  # between SIGTERM and SIGKILL when stopping processes


def free_port() -> int:
  """A TCP port that was free a moment ago (the OS picks it when binding to 0)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def flag_value(args: list[str], name: str) -> str | None:
  """The value of ``--name=v`` or ``--name v`` in ``args`` (the last one wins)."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(args):
      value = args[i + 1]
  return value


def process_env(devices_per_process: int) -> dict[str, str]:
  """This environment, with XLA's CPU device count set to the per-process share.

  ``--cpu_devices`` already asks for it, but an inherited
  ``--xla_force_host_platform_device_count`` (e.g. from a test runner) would
  otherwise still apply wherever a job skips that flag.
  """
  env = dict(os.environ)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  xla_flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  env["XLA_FLAGS"] = " ".join(xla_flags)
  env["PYTHONUNBUFFERED"] = "1"  # logs appear as they are written, not at exit
  return env


def _die_with_parent() -> None:
  """Runs in each child before exec: Linux kills it if the launcher dies first.

  Covers the launcher being SIGKILLed (e.g. by a test timeout), where no
  cleanup code of ours can run.
  """
  with contextlib.suppress(Exception):
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def exit_status(returncode: int) -> int:
  """A child's exit status as a shell reports it: 128 + N for death by signal N."""
  return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
  """'exited with code 3' or 'was killed by SIGKILL (exit status 137)'."""
  if returncode >= 0:
    return f"exited with code {returncode}"
  try:
    name = signal.Signals(-returncode).name
  except ValueError:
    name = f"signal {-returncode}"
  return f"was killed by {name} (exit status {exit_status(returncode)})"


def _signal_group(p: subprocess.Popen, signum: int) -> None:
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(p.pid, signum)  # each child leads its own group (process_group=0)


def stop(procs: list[subprocess.Popen]) -> None:
  """SIGTERM to each running process's group, then SIGKILL to those still alive after a grace."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + _GRACE_S
  for p in running:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _signal_group(p, signal.SIGKILL)
      p.wait()


def _tail(path: str, lines: int = 20) -> str:
  try:
    with open(path, errors="replace") as f:
      return "".join(f.readlines()[-lines:])
  except OSError:
    return ""


def _usage_error(message: str) -> None:
  print(f"launch_local: error: {message}", file=sys.stderr)
  sys.exit(2)


def _say(message: str) -> None:
  print(f"launch_local: {message}", file=sys.stderr, flush=True)


def kill(procs: list[subprocess.Popen]) -> None:
  """SIGKILL to each running process's group, at once."""
  for p in procs:
    if p.poll() is None:
      _signal_group(p, signal.SIGKILL)
  for p in procs:
    p.wait()


class _Echo:
  """Copies one pipe of process 0 into its log and, until ``quiet`` is set, to ``out``."""

  def __init__(self, pipe, log, out, quiet: threading.Event):
    self._thread = threading.Thread(target=self._run, args=(pipe, log, out, quiet), daemon=True)
    self._thread.start()

  @staticmethod
  def _run(pipe, log, out, quiet: threading.Event) -> None:
    for line in iter(pipe.readline, b""):
      log.write(line)
      log.flush()
      if not quiet.is_set():
        out.write(line)
        out.flush()

  def join(self) -> None:
    self._thread.join(timeout=_GRACE_S)


def main(argv: list[str]) -> None:
  job_args = argv[1:]
  n, total = NUM_PROCESSES.value, TOTAL_CPU_DEVICES.value
  if total % n:
    _usage_error(f"--total_cpu_devices={total} is not divisible by --num_processes={n}; "
                 f"use a multiple of {n}")
  for name in _OWNED_FLAGS:
    if flag_value(job_args, name) is not None:
      _usage_error(f"--{name} is set by the launcher; remove it from the job's flags")
  per_process = total // n
  log_dir = LOGS_DIR.value or flag_value(job_args, "workdir") or tempfile.mkdtemp(
      prefix="launch_local_")
  os.makedirs(log_dir, exist_ok=True)
  address = f"127.0.0.1:{PORT.value or free_port()}"
  env = process_env(per_process)
  print(f"launch_local: {n} processes x {per_process} CPU devices, coordinator {address}, "
        f"logs in {os.path.join(log_dir, 'process_<i>.log')}", flush=True)

  # (i, returncode) when process i exits, (None, signum) when the launcher gets a signal:
  # one queue, so events are handled in the order they happened. A SimpleQueue, since a
  # signal handler may put into it while the main thread waits on it.
  events: queue.SimpleQueue[tuple[int | None, int]] = queue.SimpleQueue()
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, lambda signum, _: events.put((None, signum)))
  procs: list[subprocess.Popen] = []
  echoes: list[_Echo] = []
  quiet = threading.Event()  # set once the survivors' output is only noise
  with contextlib.ExitStack() as logs:
    try:
      for i in range(n):
        cmd = [sys.executable, "-m", MODULE.value, *job_args, f"--coordinator_address={address}",
               f"--num_processes={n}", f"--process_id={i}", f"--cpu_devices={per_process}"]
        log = logs.enter_context(open(os.path.join(log_dir, f"process_{i}.log"), "wb"))
        if i == 0:
          p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               process_group=0, preexec_fn=_die_with_parent)
          echoes = [_Echo(p.stdout, log, sys.stdout.buffer, quiet),
                    _Echo(p.stderr, log, sys.stderr.buffer, quiet)]
        else:
          p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                               process_group=0, preexec_fn=_die_with_parent)
        procs.append(p)
        # One waiter per process, so the first exit is known in the order it happened.
        threading.Thread(target=lambda i=i, p=p: events.put((i, p.wait())), daemon=True).start()
      code = _supervise(procs, events, log_dir, echoes, quiet, time.monotonic() + TIMEOUT_S.value)
      stop(procs)  # first: process 0's output ends only when it does
      for echo in echoes:
        echo.join()
      sys.exit(code)
    finally:
      stop(procs)


def _supervise(procs: list[subprocess.Popen], events: queue.SimpleQueue, log_dir: str,
               echoes: list[_Echo], quiet: threading.Event, deadline: float) -> int:
  """Waits for all processes and handles the launcher's signals; the job's exit status."""
  finished: set[int] = set()
  preempted: signal.Signals | None = None  # the signal passed on to the processes
  while len(finished) < len(procs):
    try:
      i, code = events.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
      quiet.set()
      running = ", ".join(str(j) for j in range(len(procs)) if j not in finished)
      if preempted is not None:
        _say(f"process(es) {running} still running --preemption_grace_s="
             f"{PREEMPTION_GRACE_S.value:g} after {preempted.name}; killing them (SIGKILL), "
             "their last checkpoint may be older")
        kill(procs)
        return 128 + preempted
      _say(f"hung: process(es) {running} still running after --timeout_s={TIMEOUT_S.value:g}; "
           f"stopping them (SIGTERM, then SIGKILL after {_GRACE_S:g} s)")
      return 124  # what coreutils `timeout` returns
    if i is None:  # the launcher got signal `code`
      received = signal.Signals(code)
      if preempted is None and received in (signal.SIGTERM, signal.SIGINT):
        preempted = received
        for p in procs:
          if p.poll() is None:
            _signal_group(p, received)
        _say(f"got {received.name}; passed it on to every process, which saves at its next "
             f"step boundary and exits (SIGKILL after --preemption_grace_s="
             f"{PREEMPTION_GRACE_S.value:g}; a second signal kills them now)")
        deadline = time.monotonic() + PREEMPTION_GRACE_S.value
        continue
      quiet.set()
      _say(f"got {received.name}{' again' if received == preempted else ''}; killing all "
           "processes (SIGKILL)")
      kill(procs)
      return 128 + received
    if code == 0:
      finished.add(i)
      continue
    # The others are blocked in a collective with the dead one, or about to fail with an
    # error that only echoes this one: stop them quietly and report this failure.
    if i == 0:  # its own last lines go to this terminal in full
      for echo in echoes:
        echo.join()
    quiet.set()
    _say(f"process {i} {describe(code)}; stopping the others")
    if i > 0:
      log = os.path.join(log_dir, f"process_{i}.log")
      print(f"--- last lines of {log} ---\n{_tail(log)}", end="", file=sys.stderr, flush=True)
    return exit_status(code)
  if preempted is not None:
    _say(f"preempted by {preempted.name}: every process exited 0 after it (a training run "
         "saved its checkpoint); rerun the same command to resume")
  return 0


if __name__ == "__main__":
  app.run(main)
