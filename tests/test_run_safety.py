"""A run never fails silently: non-finite steps, resumes that do not fit, finished runs,
metrics after a resume, failed checkpoint saves and bad input each end in one clear line."""

import errno
import json
import os
import shutil
import struct
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

import jaxspeed
from jaxspeed.checkpoint import Checkpointer, flatten
from jaxspeed.errors import ConfigError, RunError
from jaxspeed.training import read_metrics, trainer


def _poison_updates(monkeypatch):
  """Chains a NaN update onto the run's optimizer: loss and gradients stay finite."""
  make = trainer.make_optimizer

  def poisoned(*args, **kwargs):
    nan = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u: u * jnp.nan, updates),
                                             state))
    return optax.chain(make(*args, **kwargs), nan)

  monkeypatch.setattr(trainer, "make_optimizer", poisoned)


def _fail_checkpoint_writes(monkeypatch):
  """Every checkpoint's data item fails to write in the background, as on a full disk."""
  async def full(self, item, directory):
    raise OSError(errno.ENOSPC, "No space left on device", str(directory))

  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full)


@pytest.fixture
def config(tiny_config):
  """``tiny_config`` with one layer: these tests need a run, not a model."""
  tiny_config.model.num_layers = 1
  return tiny_config


def _steps_logged(workdir) -> list[int]:
  return [int(r["step"]) for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.parametrize("steps,limit,error", [
    (10, 3, r"stopped at step [34]: .*max_consecutive_skips=3"),
    (4, 20, r"every step from 1 to 4 was skipped"),  # shorter than the limit: fails at its end
], ids=["limit_reached", "short_run"])
def test_run_skips_non_finite_updates_then_stops_without_saving_them(
    config, tmp_path, monkeypatch, steps, limit, error):
  _poison_updates(monkeypatch)
  config.steps = steps
  config.max_consecutive_skips = limit
  config.checkpoint_every = 2
  config.log_every = 1
  with pytest.raises(RunError, match=error):
    jaxspeed.train(config, str(tmp_path))
  records = read_metrics(str(tmp_path / "metrics.jsonl"))
  # Every update was NaN with a finite loss and gradient: each step is skipped and the
  # parameters stay finite (a NaN update let through would make the next loss NaN).
  assert [r["skipped_steps"] for r in records] == [r["step"] for r in records]
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
  assert len(records) <= 4  # detected one step late at most
  # Step 2's checkpoint holds the untouched initial state; nothing after it is saved.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  assert not os.path.exists(tmp_path / trainer.SUMMARY_FILE)


def test_resume_compatibility_allows_layout_and_length_only(tiny_config):
  saved = flatten(json.loads(tiny_config.to_json()))
  requested = tiny_config.copy_and_resolve_references()
  requested.steps = 50
  requested.parallel.tensor = 2
  requested.zero.stage = 3
  assert trainer.check_resume_compatible(saved, requested) == [
      "parallel.tensor: 1 -> 2", "steps: 10 -> 50", "zero.stage: 0 -> 3"]
  requested.model.d_model = 32
  requested.optim.name = "sgd"
  with pytest.raises(ConfigError, match=r"model\.d_model, optim\.name: differs .*saved 64, "
                                        r"requested 32"):
    trainer.check_resume_compatible(saved, requested)


def test_resume_finished_run_and_metrics(config, tmp_path, capsys):
  """One short run, then: rerun, steps below it, another model, a resume after a kill."""
  workdir = str(tmp_path)
  config.steps = 4
  config.log_every = 1
  config.checkpoint_every = 2
  first = jaxspeed.train(config, workdir)
  saved = json.loads((tmp_path / trainer.SUMMARY_FILE).read_text())
  assert saved["final_loss"] == first["final_loss"]

  capsys.readouterr()
  again = jaxspeed.train(config, workdir)  # complete: prints the saved summary, trains nothing
  assert "is complete (step 4 of 4)" in capsys.readouterr().out
  assert again["final_loss"] == first["final_loss"]
  assert _steps_logged(workdir) == [1, 2, 3, 4]

  config.steps = 2
  with pytest.raises(ConfigError, match=r"config\.steps: 2 is below the newest checkpoint"):
    jaxspeed.train(config, workdir)

  saved_config = (tmp_path / "config.json").read_text()
  config.steps = 6
  config.model.d_model = 32
  with pytest.raises(ConfigError, match=r"config\.model\.d_model: differs"):
    jaxspeed.train(config, workdir)
  assert (tmp_path / "config.json").read_text() == saved_config

  # Killed after logging steps 3-4 but before their checkpoint: the resume from step 2
  # logs them again, once.
  config.model.d_model = 64
  shutil.rmtree(tmp_path / "checkpoints" / "4")
  capsys.readouterr()
  jaxspeed.train(config, workdir)
  assert "resuming" in capsys.readouterr().out  # steps 4 -> 6 is a change a resume honours
  assert _steps_logged(workdir) == [1, 2, 3, 4, 5, 6]
  # TensorBoard hides the first runs' events from step 3 on: the resumed run's event file
  # starts a session with purge step 3 (the second run logged nothing).
  *_, resumed = sorted((tmp_path / "tensorboard").iterdir(), key=os.path.getmtime)
  assert [e.step for e in _events(resumed) if e.HasField("session_log")] == [3]


def _events(path) -> list:
  """The Event protos of a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto.event_pb2 import Event

  data, events, offset = path.read_bytes(), [], 0
  while offset < len(data):
    (length,) = struct.unpack("<Q", data[offset:offset + 8])
    events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
    offset += 12 + length + 4
  return events


def test_checkpointer_reports_a_failed_background_save_without_another_save(tmp_path,
                                                                             monkeypatch):
  _fail_checkpoint_writes(monkeypatch)
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(1, {"w": np.ones(4, np.float32)}, {"step": 1})
  deadline = time.time() + 60
  with pytest.raises(OSError, match="No space left"):
    while time.time() < deadline:
      checkpointer.check()
      time.sleep(0.01)
  checkpointer.close()
  assert checkpointer.latest_step() is None


def test_failed_save_stops_the_run_with_one_error(config, tmp_path, monkeypatch):
  _fail_checkpoint_writes(monkeypatch)
  with pytest.raises(RunError, match=r"saving a checkpoint in .* failed \(OSError: .*No space"):
    jaxspeed.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / trainer.SUMMARY_FILE)


def _write(path, content: bytes) -> str:
  path.write_bytes(content)
  return str(path)


def _bad_input_cases(tmp):
  """(flags, expected text of the one error line) for each user mistake."""
  corpus = lambda *paths: [f"--config.data.corpus={','.join(paths)}", f"--workdir={tmp / 'w'}"]
  words = b"the quick brown fox jumps over the lazy dog " * 40
  doc = _write(tmp / "doc.txt", words)
  afile = _write(tmp / "afile", b"x")
  return {
      "empty_txt": (corpus(_write(tmp / "empty.txt", b"")), "data.corpus: the files in"),
      "single_document": (corpus(doc), "data.corpus: has 1 document"),
      "binary": (corpus(_write(tmp / "bin.txt", bytes(range(256)) * 8), doc),
                 "is not UTF-8 text"),
      "jsonl_missing_field": (corpus(_write(tmp / "a.jsonl", b'{"body": "x"}\n')),
                              "data.jsonl_field: "),
      "jsonl_invalid": (corpus(_write(tmp / "b.jsonl", b'{"text": \n')), "invalid JSON"),
      "jsonl_not_a_string": (corpus(_write(tmp / "c.jsonl", b'{"text": 5}\n')),
                             "is int, expected a string"),
      "too_short": (corpus(_write(tmp / "s1.txt", b"ab"), _write(tmp / "s2.txt", b"cd")),
                    "config.seq_len: the train split"),
      "workdir_is_a_file": ([f"--workdir={afile}"], "--workdir: "),
      "workdir_below_a_file": ([f"--workdir={afile}/run"], "--workdir: cannot write"),
      "workdir_not_writable": (["--workdir=/sys/kernel"], "--workdir: cannot write"),
      "missing_config_file": ([f"--config={tmp / 'nope.py'}", f"--workdir={tmp / 'w'}"],
                              "--config: cannot load the config file: [Errno 2]"),
      "missing_config_file_with_overrides": (
          [f"--config={tmp / 'nope.py'}", "--config.steps=3"], "--config: cannot load"),
      "cpu_devices_0": (["--cpu_devices=0", f"--workdir={tmp / 'w'}"], "cpu_devices"),
  }


CASES = [
    "empty_txt", "single_document", "binary", "jsonl_missing_field", "jsonl_invalid",
    "jsonl_not_a_string", "too_short", "workdir_is_a_file", "workdir_below_a_file",
    "workdir_not_writable", "missing_config_file", "missing_config_file_with_overrides",
    "cpu_devices_0"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, monkeypatch, capsys):
  """``experiments.train`` through its app runner, in-process; all fail before compiling."""
  from absl import flags

  from experiments import common
  from experiments import train as train_app

  # Each parse of --config=FILE defines a config.* override flag per field; drop the
  # previous case's so that the runner can parse again in this process.
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  args, expected = _bad_input_cases(tmp_path)[case]
  tiny = ["--config=configs/gpt_tiny.py", "--cpu_devices=8", "--config.seq_len=32",
          "--config.model.max_seq_len=32", "--config.batch_size=8"]
  if any(a.startswith("--config=") for a in args):  # the case brings its own config
    tiny = ["--cpu_devices=8"]
  monkeypatch.setattr(sys, "argv", ["train", *tiny, *args])
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with pytest.raises(SystemExit) as exit_info:
    common.run_app(train_app.main)
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2, err
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert expected in err, err
