"""Checkpoint/resume reproduces the uninterrupted run; a killed save is never resumed."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from helpers import subprocess_env

import jaxspeed
from jaxspeed.training import read_metrics


def _losses(workdir) -> dict[int, float]:
  return {int(r["step"]): r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))}


def test_resume_reproduces_uninterrupted_losses(tiny_config, tmp_path):
  config = tiny_config
  config.parallel.data = 4
  config.parallel.tensor = 2
  config.zero.stage = 1
  config.log_every = 1
  config.checkpoint_every = 5
  config.optim.decay = 20  # the schedule must not depend on where the run stops
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")

  config.steps = 20
  jaxspeed.train(config, straight)
  config.steps = 10
  jaxspeed.train(config, split)
  config.steps = 20
  jaxspeed.train(config, split)

  expected, resumed = _losses(straight), _losses(split)
  assert sorted(resumed) == list(range(1, 21))
  assert [resumed[s] for s in range(11, 21)] == [expected[s] for s in range(11, 21)]
  assert sorted(os.listdir(os.path.join(split, "checkpoints"))) == ["10", "15", "20"]


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_killed_during_save_resumes_from_a_complete_checkpoint(tmp_path):
  """SIGKILL while checkpointing every step; the next run must restore and finish."""
  workdir = str(tmp_path)
  env = subprocess_env()
  args = [sys.executable, "-m", "experiments.train", "--config=configs/gpt_tiny.py",
          f"--workdir={workdir}", "--cpu_devices=8", "--config.model.num_layers=1",
          "--config.model.d_model=64", "--config.model.d_ff=128", "--config.seq_len=32",
          "--config.model.max_seq_len=32", "--config.checkpoint_every=1",
          "--config.keep_checkpoints=2", "--config.sample_tokens=0", "--config.log_every=1"]
  log = open(tmp_path / "killed.log", "w+")  # noqa: SIM115
  proc = subprocess.Popen([*args, "--config.steps=1000"], cwd=REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 120
  while time.time() < deadline:
    steps = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    if len([d for d in steps if d.isdigit()]) >= 2:
      break
    if proc.poll() is not None:
      log.seek(0)
      pytest.fail(f"training exited early:\n{log.read()[-2000:]}")
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()

  complete = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert complete, "no checkpoint was written before the kill"
  result = subprocess.run([*args, f"--config.steps={complete[-1] + 2}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resumed from step" in result.stdout
  assert complete[-1] + 2 in _losses(workdir)
