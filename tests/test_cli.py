"""Console scripts: ``--config`` names of packaged configs, and the configs themselves."""

import os

import pytest
from conftest import REPO

from experiments.cli import resolve_config_args
from jaxspeed import configs


def test_packaged_names_become_paths_and_files_pass_through():
  args = resolve_config_args(["--config=gpt_tiny", "--config.steps=2", "--", "--config=demo:x"])
  assert args[0] == f"--config={configs.path('gpt_tiny')}" and os.path.isfile(args[0][9:])
  assert args[1:3] == ["--config.steps=2", "--"]
  assert args[3] == f"--config={configs.path('demo')}:x"
  path = os.path.join(REPO, "configs", "gpt_tiny.py")
  assert resolve_config_args([f"--config={path}"]) == [f"--config={path}"]


def test_unknown_config_is_one_line_and_exit_code_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    resolve_config_args(["--config=gpt_tinyy"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "gpt_tinyy" in err and "gpt_tiny" in err


@pytest.mark.parametrize("name", configs.NAMES)
def test_repository_configs_are_the_packaged_ones(name):
  import importlib

  wrapper = importlib.import_module(f"configs.{name}").get_config()
  assert wrapper == importlib.import_module(f"jaxspeed.configs.{name}").get_config()
