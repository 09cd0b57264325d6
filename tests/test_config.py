"""Bad input is rejected with a message naming the key, before anything compiles."""

import os
import subprocess
import sys

import jax
import pytest
from conftest import REPO

import jaxspeed
from jaxspeed.config import check_override_keys


def _set(config, key, value):
  *sections, last = key.split(".")
  node = config
  for part in sections:
    node = node[part]
  node[last] = value


BAD_INPUTS = [
    # (overrides, key named in the error)
    ({"parallel.data": 3}, "parallel"),
    ({"parallel.tensor": -2}, "parallel.tensor"),
    ({"parallel.data": -1, "parallel.fsdp": -1}, "parallel.fsdp"),
    ({"parallel.pipeline": 2}, "parallel.pipeline"),
    ({"optim.name": "adagrad"}, "optim.name"),
    ({"optim.learning_rate": -1e-3}, "optim.learning_rate"),
    ({"parallel.data": 8, "batch_size": 12}, "batch_size"),
    ({"parallel.data": 1, "parallel.tensor": 8}, "model.num_heads"),
    ({"data.corpus": "/no/such/file.txt"}, "data.corpus"),
    ({"bogus_key": 1}, "bogus_key"),
    ({"zero.stage": 4}, "zero.stage"),
    ({"seq_len": 64}, "seq_len"),
    ({"model.position": "sinusoidal"}, "model.position"),
    ({"data.tokenizer": "wordpiece"}, "data.tokenizer"),
    ({"model.dtype": "float16"}, "model.dtype"),
    ({"parallel.data": 2, "parallel.sequence": 4, "model.num_kv_heads": 3}, "model.num_kv_heads"),
]


@pytest.fixture
def compile_events():
  events = []

  def listener(name, *args, **kwargs):
    if "compile" in name:
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("overrides,key", BAD_INPUTS, ids=[k for _, k in BAD_INPUTS])
def test_bad_input_names_key_before_compiling(overrides, key, tiny_config, compile_events):
  for k, v in overrides.items():
    _set(tiny_config, k, v)
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == key
  assert f"config.{key}" in str(info.value)
  assert compile_events == []


def test_good_config_builds(tiny_config):
  setup = jaxspeed.build(tiny_config)
  assert dict(setup.mesh.shape)["data"] == 8


def test_unknown_override_key_is_named():
  with pytest.raises(jaxspeed.ConfigError, match=r"config\.model\.foo"):
    check_override_keys(["--config.model.foo=3"])
  check_override_keys(["--config.model.num_layers=3", "--workdir=x"])


@pytest.mark.parametrize("flag,key", [("--config.optim.name=adagrad", "config.optim.name"),
                                      ("--config.model.foo=3", "config.model.foo")])
def test_cli_exits_nonzero_naming_the_key(flag, key, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/gpt_tiny.py",
       f"--workdir={tmp_path}", flag], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2
  assert key in result.stderr
  assert "Traceback" not in result.stderr
