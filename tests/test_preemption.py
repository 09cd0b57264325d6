"""SIGTERM/SIGINT stop a run at a step boundary with a committed checkpoint; a rerun resumes."""

import os
import signal
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
    assert not preemption.stop_now()
    os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag
    time.sleep(0.01)
    assert preemption.stop_now() and preemption.signal == signal.SIGINT
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


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_sigterm_saves_exits_0_and_the_rerun_resumes_identically(tmp_path):
  args = [sys.executable, "-m", "experiments.train", "--config=configs/gpt_tiny.py",
          "--cpu_devices=2", "--config.parallel.data=2", "--config.parallel.fsdp=1",
          "--config.parallel.tensor=1", "--config.model.num_layers=1",
          "--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_heads=2",
          "--config.seq_len=32", "--config.model.max_seq_len=32", "--config.batch_size=8",
          "--config.sample_tokens=0", "--config.log_every=1", "--config.eval_every=100000",
          "--config.checkpoint_every=100000", "--config.optim.decay=100000"]
  env = subprocess_env()
  workdir = str(tmp_path / "preempted")
  log = open(tmp_path / "preempted.log", "w+")  # noqa: SIM115
  proc = subprocess.Popen([*args, f"--workdir={workdir}", "--config.steps=100000"], cwd=REPO,
                          env=env, stdout=log, stderr=subprocess.STDOUT)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while _complete_lines(metrics) < 3:
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      log.seek(0)
      pytest.fail(f"training did not start:\n{log.read()[-2000:]}")
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=60) == 0
  log.seek(0)
  output = log.read()
  reached = max(_losses(workdir))
  assert (f"preempted: saved step {reached} in {os.path.join(workdir, 'checkpoints')}; rerun "
          "the same command to resume") in output, output[-2000:]
  assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == reached
  assert not os.path.exists(os.path.join(workdir, "summary.json"))  # not complete

  end = reached + 3
  outputs = []
  for directory in (workdir, str(tmp_path / "straight")):
    result = subprocess.run([*args, f"--workdir={directory}", f"--config.steps={end}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs.append(result.stdout)
  assert f"resumed from step {reached}" in outputs[0]
  resumed, straight = _losses(workdir), _losses(str(tmp_path / "straight"))
  assert sorted(resumed) == list(range(1, end + 1))
  for step in range(1, end + 1):
    assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
