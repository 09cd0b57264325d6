r"""Runs a multi-process job on this machine: N processes, one JAX runtime.

  python -m experiments.launch_local --num_processes=2 -- \
      --config=configs/gpt_tiny.py --workdir=results/mp --config.steps=20

starts N copies of ``python -m <module> <args after -->`` with
``--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i
--cpu_devices=<total_cpu_devices / N>`` appended. Together they form one
mesh of ``total_cpu_devices`` CPU devices through ``jax.distributed`` (gloo
collectives), exactly as separate hosts would: this is a stand-in for a
cluster scheduler, not a protocol of its own.

Process 0's output goes to this terminal; process ``i > 0`` writes to
``<logs_dir>/process_<i>.log`` (``--logs_dir``, else the job's ``--workdir``).
If any process fails or ``--timeout_s`` passes, the others are stopped and the
launcher exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
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

# Flags the launcher sets on every process; passing them after `--` is a mistake.
_OWNED_FLAGS = ("coordinator_address", "num_processes", "process_id", "cpu_devices")
_GRACE_S = 5.0  # between SIGTERM and SIGKILL when stopping processes
_POLL_S = 0.1


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


def stop(procs: list[subprocess.Popen]) -> None:
  """SIGTERM to every running process, then SIGKILL to those still alive."""
  running = [p for p in procs if p.poll() is None]
  for p in running:
    with contextlib.suppress(ProcessLookupError):
      p.terminate()
  deadline = time.monotonic() + _GRACE_S
  for p in running:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      with contextlib.suppress(ProcessLookupError):
        p.kill()
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


def _raise_on_sigterm(signum, frame):
  del frame
  raise SystemExit(128 + signum)  # unwinds through the `finally` that stops the children


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
  print(f"launch_local: {n} processes x {per_process} CPU devices, coordinator {address}"
        + (f", logs of processes 1..{n - 1} in {log_dir}" if n > 1 else ""), flush=True)

  signal.signal(signal.SIGTERM, _raise_on_sigterm)
  procs: list[subprocess.Popen] = []
  logs: list[str | None] = []
  try:
    for i in range(n):
      cmd = [sys.executable, "-m", MODULE.value, *job_args, f"--coordinator_address={address}",
             f"--num_processes={n}", f"--process_id={i}", f"--cpu_devices={per_process}"]
      if i == 0:  # inherits this terminal
        logs.append(None)
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
        continue
      logs.append(os.path.join(log_dir, f"process_{i}.log"))
      with open(logs[i], "w") as out:
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      preexec_fn=_die_with_parent))
    sys.exit(_wait(procs, logs, time.monotonic() + TIMEOUT_S.value))
  finally:
    stop(procs)


def _wait(procs: list[subprocess.Popen], logs: list[str | None], deadline: float) -> int:
  """Waits for all processes; on the first failure or at the deadline, the exit code."""
  while time.monotonic() < deadline:
    codes = [p.poll() for p in procs]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      i, code = failed[0]
      # One dead process leaves the others blocked in a collective forever.
      print(f"launch_local: process {i} exited with code {code}; stopping the others",
            file=sys.stderr, flush=True)
      if logs[i]:
        print(f"--- last lines of {logs[i]} ---\n{_tail(logs[i])}", file=sys.stderr, flush=True)
      return code if code > 0 else 1
    if all(c == 0 for c in codes):
      return 0
    time.sleep(_POLL_S)
  print(f"launch_local: timed out after {TIMEOUT_S.value:g} s; stopping all processes",
        file=sys.stderr, flush=True)
  return 124  # what coreutils `timeout` returns


if __name__ == "__main__":
  app.run(main)
