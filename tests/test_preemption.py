"""SIGTERM/SIGINT stop a run at a step boundary with a committed checkpoint; a rerun resumes."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO
from helpers import subprocess_env

from jaxspeed.checkpoint import Checkpointer
from jaxspeed.training import read_metrics
from jaxspeed.training.preemption import Preemption


def test_handlers_set_a_flag_and_are_restored():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with Preemption() as preemption:
    assert preemption.at_boundary() == (False, False)
    assert preemption.at_boundary(save_failed=True) == (False, True)  # one process: at once
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag
    time.sleep(0.01)
    assert preemption.at_boundary() == (True, False) and preemption.signal == signal.SIGINT
  assert {s: signal.getsignal(s) for s in before} == before


def test_second_signal_ends_the_process_at_once():
  code = textwrap.dedent("""
      import os, signal, time
      from jaxspeed.training.preemption import Preemption
      with Preemption():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
      print("not reached")
  """)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
  assert "not reached" not in result.stdout


def _complete_lines(path) -> int:
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return f.read().count("\n")


def _losses(workdir) -> dict[int, float]:
  return {int(r["step"]): r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))}


TRAIN = [sys.executable, "-m", "experiments.train", "--config=configs/gpt_tiny.py",
         "--config.parallel.fsdp=1", "--config.parallel.tensor=1",
         "--config.model.num_layers=1", "--config.model.d_model=32", "--config.model.d_ff=64",
         "--config.model.num_heads=2", "--config.seq_len=32", "--config.model.max_seq_len=32",
         "--config.batch_size=8", "--config.sample_tokens=0", "--config.log_every=1",
         "--config.eval_every=100000", "--config.checkpoint_every=100000",
         "--config.optim.decay=100000"]


def _wait_for_training(procs, logs, metrics: str) -> None:
  """Returns once ``metrics`` has 3 steps; fails if a process exits first."""
  deadline = time.time() + 120
  while _complete_lines(metrics) < 3:
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      for p in procs:
        p.kill()
      logs[0].seek(0)
      pytest.fail(f"training did not start:\n{logs[0].read()[-2000:]}")
    time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_sigterm_saves_exits_0_and_the_rerun_resumes_identically(tmp_path):
  """SIGTERM to ``launch_local`` (one process): it passes the signal on, the run saves, 0."""
  args = [*TRAIN, "--config.parallel.data=2"]
  env = subprocess_env()
  workdir = str(tmp_path / "preempted")
  log = open(tmp_path / "preempted.log", "w+")  # noqa: SIM115
  launcher = [sys.executable, "-m", "experiments.launch_local", "--num_processes=1",
              "--total_cpu_devices=2", "--", *args[3:]]  # args[:3] runs experiments.train
  proc = subprocess.Popen([*launcher, f"--workdir={workdir}", "--config.steps=100000"],
                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  _wait_for_training([proc], [log], os.path.join(workdir, "metrics.jsonl"))
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=60)
  log.seek(0)
  output = log.read()
  assert code == 0, output[-2000:]
  reached = max(_losses(workdir))
  assert (f"preempted: saved step {reached} in {os.path.join(workdir, 'checkpoints')}; rerun "
          "the same command to resume") in output, output[-2000:]
  assert "launch_local: preempted by SIGTERM: every process exited 0" in output
  assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == reached
  assert not os.path.exists(os.path.join(workdir, "summary.json"))  # not complete

  end = reached + 3
  outputs = []
  for directory in (workdir, str(tmp_path / "straight")):
    result = subprocess.run([*args, "--cpu_devices=2", f"--workdir={directory}",
                             f"--config.steps={end}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs.append(result.stdout)
  assert f"resumed from step {reached}" in outputs[0]
  resumed, straight = _losses(workdir), _losses(str(tmp_path / "straight"))
  assert sorted(resumed) == list(range(1, end + 1))
  for step in range(1, end + 1):
    assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_two_processes_stop_at_the_same_step_when_one_is_signalled(tmp_path):
  """SIGTERM to process 1 only: both save the same step and exit 0 (no hang)."""
  workdir = str(tmp_path)
  env = subprocess_env()
  # A free port (as launch_local picks one; importing it here would define its flags in
  # this process, next to experiments.train's of the same names).
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]  # noqa: SIM115
  procs = [subprocess.Popen(
      [*TRAIN, "--cpu_devices=2", "--config.parallel.data=4", f"--workdir={workdir}",
       "--config.steps=100000", f"--coordinator_address={address}", "--num_processes=2",
       f"--process_id={i}"], cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
      for i in range(2)]
  try:
    _wait_for_training(procs, logs, os.path.join(workdir, "metrics.jsonl"))
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  logs[0].seek(0)
  output = logs[0].read()
  assert codes == [0, 0], output[-2000:]
  reached = max(_losses(workdir))
  assert f"preempted: saved step {reached} in" in output
  assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == reached
