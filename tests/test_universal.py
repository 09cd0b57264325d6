"""The universal checkpoint: export -> import round-trips every leaf; bad input is one line."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from helpers import assert_trees_close, subprocess_env

import jaxspeed
from jaxspeed.checkpoint import (
    Checkpointer,
    checkpoint_dir,
    export_universal,
    import_universal,
    load_params,
    save_run_config,
)
from jaxspeed.checkpoint.layout import flatten_with_paths, unstack
from jaxspeed.checkpoint.universal import INDEX, read_universal
from jaxspeed.errors import ConfigError, FlagError
from jaxspeed.training.trainer import evaluate


def _saved_run(config, workdir: str, step: int = 3):
  """A run directory whose step-``step`` checkpoint holds a freshly initialized state.

  Returns:
    (the Setup, the state as restored from that checkpoint).
  """
  setup = jaxspeed.build(config)
  save_run_config(config, workdir)
  checkpointer = Checkpointer(checkpoint_dir(workdir))
  with jax.set_mesh(setup.mesh):
    checkpointer.save(step, setup.init_state(), setup.train_data.state)
    checkpointer.close()
    return setup, Checkpointer(checkpoint_dir(workdir)).restore(step, setup.abstract_state())


@pytest.mark.parametrize("parallel,optimizer", [
    ({"stage": 2, "data": 4}, "adamw"),  # layers stacked [2, 1, ...]
    ({"data": 8}, "zero_one_adam"),  # per-worker momenta [8, ...]
], ids=["pipeline", "zero_one_adam"])
def test_export_import_round_trips_every_leaf_bit_for_bit(tiny_config, tmp_path, parallel,
                                                          optimizer):
  config = tiny_config
  config.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64)
  config.parallel.update({"data": 1, "fsdp": 1, "tensor": 1, **parallel})
  config.optim.name = optimizer
  run, universal, imported = (str(tmp_path / d) for d in ("run", "universal", "imported"))
  setup, (state, data) = _saved_run(config, run)
  export_universal(run, universal)
  with open(os.path.join(universal, INDEX)) as f:
    index = json.load(f)
  assert index["step"] == 3 and index["config"]["optim"]["name"] == optimizer
  by_path = {e["path"]: e for e in index["leaves"]}
  # Layers are unstacked: one file per layer, with the parameter's logical axes.
  kernel = by_path["params/layer_1/mlp/wi"]
  assert kernel["shape"] == [32, 64] and kernel["logical_axes"] == ["embed", "mlp"]
  mu = by_path["opt_state/mu/layer_1/mlp/wi" if optimizer == "zero_one_adam"
               else "opt_state/0/mu/layer_1/mlp/wi"]
  assert mu["logical_axes"] == (["workers", "embed", "mlp"] if optimizer == "zero_one_adam"
                                else ["embed", "mlp"])
  assert not any("layers" in p for p in by_path)

  assert import_universal(universal, imported) == 3
  with jax.set_mesh(setup.mesh):
    restored, restored_data = Checkpointer(checkpoint_dir(imported)).restore(
        3, setup.abstract_state())
  assert_trees_close(restored, state, rtol=0)
  assert restored_data == data


@pytest.mark.parametrize("damage,message", [
    (lambda d: os.remove(os.path.join(d, "params", "embed", "table.npy")),
     r"params/embed/table\.npy is missing"),
    (lambda d: _truncate(os.path.join(d, "params", "embed", "table.npy")),
     r"params/embed/table\.npy is truncated or unreadable"),
    (lambda d: np.save(os.path.join(d, "params", "embed", "table.npy"), np.zeros((3, 4))),
     r"table\.npy is float64\[3, 4\], the index says float32\[256, 32\]"),
    (lambda d: os.remove(os.path.join(d, INDEX)), r"index\.json not found"),
], ids=["missing", "truncated", "another_shape", "no_index"])
def test_bad_universal_checkpoint_is_one_line_naming_the_file(tiny_config, tmp_path, damage,
                                                               message):
  config = tiny_config
  config.model.update(num_layers=1, num_heads=2, d_model=32, d_ff=64)
  run, universal = str(tmp_path / "run"), str(tmp_path / "universal")
  _saved_run(config, run)
  export_universal(run, universal)
  damage(universal)
  with pytest.raises(FlagError, match=message) as error:
    read_universal(universal)
  assert len(str(error.value).splitlines()) == 1
  with pytest.raises(FlagError, match=message):
    import_universal(universal, str(tmp_path / "imported"))
  assert not os.path.exists(tmp_path / "imported" / "checkpoints")


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def test_export_and_import_refuse_to_overwrite(tiny_config, tmp_path):
  config = tiny_config
  config.model.update(num_layers=1, num_heads=2, d_model=32, d_ff=64)
  run, universal = str(tmp_path / "run"), str(tmp_path / "universal")
  _saved_run(config, run)
  with pytest.raises(FlagError, match=r"--workdir: .* holds no trained run"):
    export_universal(str(tmp_path / "nothing"), universal)
  export_universal(run, universal)
  with pytest.raises(FlagError, match=r"--universal_dir: .* is not empty"):
    export_universal(run, universal)
  with pytest.raises(FlagError, match=r"--workdir: .* already holds a run"):
    import_universal(universal, run)


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_cli_exports_then_refuses_an_import_for_another_model(tiny_config, tmp_path):
  config = tiny_config
  config.model.update(num_layers=1, num_heads=2, d_model=32, d_ff=64)
  run, universal = str(tmp_path / "run"), str(tmp_path / "universal")
  _saved_run(config, run)
  cli = [sys.executable, "-m", "experiments.universal"]
  run_cli = lambda *args: subprocess.run([*cli, *args], cwd=REPO, env=subprocess_env(),
                                         capture_output=True, text=True, timeout=120)
  exported = run_cli("--export", f"--workdir={run}", f"--universal_dir={universal}")
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert os.path.exists(os.path.join(universal, INDEX))
  refused = run_cli("--import", f"--universal_dir={universal}",
                    f"--workdir={tmp_path / 'imported'}", "--config=configs/gpt_tiny.py")
  assert refused.returncode == 2
  err = refused.stderr.strip()
  assert len(err.splitlines()) == 1 and "model.d_model: saved 32, requested" in err, err
  assert not os.path.exists(tmp_path / "imported")


def test_fine_tuning_starts_from_the_parameters_with_another_optimizer_and_layout(tiny_config,
                                                                                  tmp_path):
  """``init_params_from``: a universal checkpoint or a run directory; the parameters only."""
  config = tiny_config
  config.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64)
  config.parallel.update(data=8, fsdp=1, tensor=1)
  run, universal = str(tmp_path / "run"), str(tmp_path / "universal")
  setup, (pretrained, _) = _saved_run(config, run)
  with jax.set_mesh(setup.mesh):
    pretrained_val_loss = evaluate(setup, pretrained.params)
  export_universal(run, universal)

  # Another optimizer and layout, through the trainer.
  tuned = config.copy_and_resolve_references()
  tuned.update(steps=1, eval_every=1, init_params_from=universal)
  tuned.optim.name = "lamb"
  tuned.parallel.update(data=4, tensor=2)
  summary = jaxspeed.train(tuned, str(tmp_path / "tuned"))
  assert summary["initial_val_loss"] == pytest.approx(pretrained_val_loss, rel=1e-5)

  # A run directory works as well, here into a pipeline whose stacked layers are built
  # from layer_0 and layer_1; the state starts at step 0 with a fresh optimizer.
  tuned.update(init_params_from=run, microbatches=2)
  tuned.parallel.update(stage=2, data=4, tensor=1)
  setup = jaxspeed.build(tuned)
  with jax.set_mesh(setup.mesh):
    params, step = load_params(run, setup.abstract_state().params)
    state = setup.init_state(params)
  assert step == 3 and int(state.step) == 0
  assert "layers" in state.params
  unstacked = unstack(flatten_with_paths({"params": jax.device_get(state.params)}))
  expected = flatten_with_paths({"params": jax.device_get(pretrained.params)})
  assert unstacked.keys() == expected.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(unstacked[path], value, err_msg="/".join(path))
  assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state[0].mu))


def test_fine_tuning_from_another_model_or_nothing_is_one_line(tiny_config, tmp_path):
  config = tiny_config
  config.model.update(num_layers=1, num_heads=2, d_model=32, d_ff=64)
  run = str(tmp_path / "run")
  _saved_run(config, run)
  config.model.update(d_model=64, d_ff=128)
  setup = jaxspeed.build(config)
  with pytest.raises(ConfigError, match=r"^config\.init_params_from: .*run holds another "
                     r"model's parameters: .*embed/table") as error:
    load_params(run, setup.abstract_state().params)
  assert len(str(error.value).splitlines()) == 1
  config.init_params_from = str(tmp_path / "nothing")
  with pytest.raises(ConfigError, match=r"nothing is neither a universal checkpoint"):
    jaxspeed.train(config, str(tmp_path / "new"))
  assert not os.path.exists(tmp_path / "new" / "config.json")
