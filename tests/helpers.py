"""Small shared helpers for tests."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
from absl.flags import FLAGS
from conftest import FAST_COMPILE

import jaxspeed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_trees_close(actual, desired, atol: float = 0.0, rtol: float = 1e-7) -> None:
  """Asserts equal tree structure, then ``np.testing.assert_allclose`` leaf by leaf.

  Unlike zipping two ``jax.tree.leaves`` lists, a missing or extra leaf fails
  here instead of being skipped. ``atol=rtol=0`` asks for exact equality.
  """
  actual_def, desired_def = jax.tree.structure(actual), jax.tree.structure(desired)
  assert actual_def == desired_def, f"tree structures differ:\n{actual_def}\n{desired_def}"
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(desired)]
  for path, a, d in zip(paths, jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(d), atol=atol, rtol=rtol,
                               err_msg=f"leaf {path}")


def train_metrics(config, num_steps: int, devices=None):
  """Runs ``num_steps`` train steps in-process.

  Returns:
    (per-step metrics on the host, the ``Setup``, the final ``TrainState``).
  """
  setup = jaxspeed.build(config, devices=devices)
  history = []
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    for _ in range(num_steps):
      state, metrics = setup.train_step(state, setup.to_device(setup.train_data.next_batch()))
      history.append(jax.device_get(metrics))
  return history, setup, state


def train_losses(config, num_steps: int, devices=None):
  """(per-step losses, the ``Setup``, the final ``TrainState``) of ``train_metrics``."""
  history, setup, state = train_metrics(config, num_steps, devices)
  return [float(m["loss"]) for m in history], setup, state


def compiled_step_text(setup) -> str:
  """The compiled HLO text of ``setup``'s first train step (abstract state, first batch)."""
  with jax.set_mesh(setup.mesh):
    return setup.train_step.lower(setup.abstract_state(), setup.to_device(
        setup.train_data.batch_at(0))).compile().as_text()


def subprocess_env() -> dict[str, str]:
  """This environment for a child process that picks its own device count.

  Without conftest.py's 8-device XLA flag; with its fast-compile flag and this run's
  compilation cache.
  """
  env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  return env


def _check_outputs(name: str, output_dir, stdout: str) -> dict:
  """The output convention of every experiment: ``<name>.json`` and ``.md``, a printed table."""
  with open(os.path.join(output_dir, f"{name}.json")) as f:
    payload = json.load(f)
  assert set(payload) == {"summary", "rows", "config", "env"}
  assert os.path.exists(os.path.join(output_dir, f"{name}.md"))
  assert "|" in stdout
  return payload


def import_experiment(name: str):
  """``experiments.<name>`` imported afresh, the flags of experiments imported before forgotten
  (the apps define flags of the same names)."""
  stale = {flag.name for module, defined in FLAGS.flags_by_module_dict().items()
           if module.startswith("experiments.") and module != "experiments.common"
           for flag in defined}
  for flag_name in stale & set(FLAGS):
    delattr(FLAGS, flag_name)
  for module in [m for m in sys.modules if m.startswith("experiments.")]:
    if module != "experiments.common":
      del sys.modules[module]
  return importlib.import_module(f"experiments.{name}")


def run_experiment(name: str, output_dir, *flag_args: str) -> dict:
  """Runs ``experiments.<name> --quick`` in this process; returns its JSON payload.

  The experiment's flags are parsed as its app would parse them, and its
  ``main`` runs on this process's devices (8 virtual CPUs, fixed when JAX
  started): an experiment asking for more fails here, one asking for fewer
  sees all 8, so use this only for experiments that do not need exactly their
  own device count. Each call forgets the flags of the experiment run before
  (the apps define flags of the same names) and imports the module afresh.
  """
  from experiments import common

  experiment = import_experiment(name)
  argv = [name, "--quick", f"--output_dir={output_dir}", *flag_args]

  def setup_devices(num: int | None = None) -> None:
    assert (num or common.CPU_DEVICES.value) <= jax.device_count(), "needs its own process"

  original, common.setup_devices = common.setup_devices, setup_devices
  out = io.StringIO()
  try:
    FLAGS.unparse_flags()
    FLAGS(argv)
    with contextlib.redirect_stdout(out):
      experiment.main(argv[:1])
  finally:
    common.setup_devices = original
    FLAGS.unparse_flags()
  return _check_outputs(name, output_dir, out.getvalue())


def run_experiment_subprocess(name: str, output_dir, *flag_args: str,
                              timeout: int = 300) -> dict:
  """Runs ``python -m experiments.<name> --quick`` in its own process (own device count)."""
  result = subprocess.run(
      [sys.executable, "-m", f"experiments.{name}", "--quick", f"--output_dir={output_dir}",
       *flag_args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return _check_outputs(name, output_dir, result.stdout)


def random_expert_weights(key, num_experts: int, d: int, f: int):
  """Random ``ExpertWeights`` of ``num_experts`` experts [d -> f -> d], scaled like an init."""
  from jaxspeed.moe.experts import ExpertWeights

  keys = jax.random.split(key, 4)
  return ExpertWeights(jax.random.normal(keys[0], (num_experts, d, f)) / np.sqrt(d),
                       jax.random.normal(keys[1], (num_experts, f)),
                       jax.random.normal(keys[2], (num_experts, f, d)) / np.sqrt(f),
                       jax.random.normal(keys[3], (num_experts, d)))
