"""The config schema: every error names a real key, and the checks no run can slip past."""

import ast
import logging
import pathlib

import ml_collections
import pytest

from jaxspeed.compatibility import COMPATIBILITY, TECHNIQUES, compatibility_markdown
from jaxspeed.config import Config, config_warnings, default_config, validate, validate_rlhf
from jaxspeed.errors import ConfigError
from jaxspeed.inference.kv_policies import KvPolicyConfig
from jaxspeed.rlhf.config import RlhfConfig
from jaxspeed.schema import Section, config_fields

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxspeed"
# Names that are not config keys but absl flags and arguments of library calls.
NOT_CONFIG = {"workdir", "cpu_devices", "prompts", "tokens"}


def _key_paths(node: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  paths = set()
  for key, value in node.items():
    paths.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      paths |= _key_paths(value, f"{prefix}{key}.")
  return paths


def _named_keys():
  """(file:line, literal key or f-string prefix) of every ``ConfigError(...)`` in the package."""
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigError"
              and node.args):
        continue
      arg, where = node.args[0], f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
      if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        yield where, arg.value, False
      elif isinstance(arg, ast.JoinedStr):
        prefix = ""
        for part in arg.values:
          if not isinstance(part, ast.Constant):
            break
          prefix += part.value
        if prefix:
          yield where, prefix, True


def test_every_config_error_names_a_real_key():
  paths = _key_paths(default_config()) | NOT_CONFIG
  named = list(_named_keys())
  assert len(named) > 50  # the scan sees the package's errors
  bad = []
  for where, key, is_prefix in named:
    # An f-string prefix "a.b." must be a section; "a.b_" would be a partial name.
    ok = key.rstrip(".") in paths if is_prefix and key.endswith(".") else key in paths
    if not ok:
      bad.append(f"{where}: {key!r}")
  assert not bad, "ConfigError names keys that are not in default_config():\n" + "\n".join(bad)


def _float_keys(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys += _float_keys(value, f"{prefix}{key}.")
    elif isinstance(value, float):
      keys.append(prefix + key)
  return keys


def _set(config, key, value):
  *sections, last = key.split(".")
  for part in sections:
    config = config[part]
  config[last] = value


def _error_key(config, rlhf=False) -> str | None:
  try:
    (validate_rlhf if rlhf else validate)(config, 8)
  except ConfigError as e:
    return e.key
  return None


def test_sections_nest_under_their_keys():
  """A section's KEY is its place in the config, so its errors name real keys."""
  def walk(cls, key):
    assert key == cls.KEY
    for f in config_fields(cls):
      if isinstance(f.default_factory, type) and issubclass(f.default_factory, Section):
        walk(f.default_factory, f"{key}.{f.name}" if key else f.name)
  walk(Config, "")
  walk(RlhfConfig, "rlhf")


def test_default_config_validates(tiny_config):
  assert _error_key(default_config()) is None
  assert _error_key(tiny_config) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_every_float_must_be_finite(value):
  keys = _float_keys(default_config())
  assert {"optim.learning_rate", "optim.grad_clip", "rlhf.ppo.kl_ctl"} <= set(keys)
  for key in keys:
    config = default_config()
    _set(config, key, value)
    assert _error_key(config) == key, key


@pytest.mark.parametrize("ratio,ok", [(0.0, True), (1.0, True), (1.5, False), (-0.1, False)])
def test_min_lr_ratio_in_unit_interval(ratio, ok):
  config = default_config()
  config.optim.min_lr_ratio = ratio
  assert _error_key(config) == (None if ok else "optim.min_lr_ratio")


def test_kv_window_rule_in_one_place():
  KvPolicyConfig(policy="local", window=0)  # the window is MiniKV's only
  with pytest.raises(ConfigError) as e:
    KvPolicyConfig(policy="minikv", window=0)
  assert e.value.key == "inference.kv_compression.window"
  config = default_config()
  config.inference.kv_compression.policy = "minikv"
  config.inference.kv_compression.window = 0
  assert _error_key(config) == "inference.kv_compression.window"
  config.inference.kv_compression.window = -1
  config.inference.kv_compression.policy = "h2o"
  assert _error_key(config) == "inference.kv_compression.window"


def test_readme_holds_the_rendered_compatibility_table():
  readme = (PACKAGE.parent / "README.md").read_text()
  start = readme.index("<!-- compatibility table")
  start = readme.index("\n", start) + 1
  end = readme.index("<!-- end compatibility table -->")
  assert readme[start:end] == compatibility_markdown()


COMBINATIONS = [
    # (overrides, key of the second technique of the pair)
    ({"parallel.sequence": 2, "optim.name": "onebit_adam"}, "optim.name"),
    ({"parallel.stage": 2, "data_efficiency.pld.enabled": True}, "data_efficiency.pld.enabled"),
    ({"parallel.stage": 2, "optim.name": "zero_one_adam"}, "optim.name"),
    ({"moe.num_experts": 2, "data_efficiency.pld.enabled": True}, "data_efficiency.pld.enabled"),
    ({"moe.num_experts": 2, "model.name": "bert"}, "moe.num_experts"),
    ({"parallel.expert": 2, "moe.num_experts": 2, "optim.name": "onebit_lamb"}, "optim.name"),
    ({"model.name": "bert", "sequence_parallel.pad": True}, "sequence_parallel.pad"),
    ({"optim.name": "onebit_lamb", "model.param_dtype": "bfloat16"}, "model.param_dtype"),
    ({"model.name": "bert", "data_efficiency.curriculum.enabled": True},
     "data_efficiency.curriculum.enabled"),
]


@pytest.mark.parametrize("overrides,key", COMBINATIONS, ids=[k for _, k in COMBINATIONS])
def test_incompatible_techniques_name_the_second_key(overrides, key, tiny_config):
  tiny_config.model.num_layers = 4
  for k, v in overrides.items():
    _set(tiny_config, k, v)
  assert _error_key(tiny_config) == key
  # Each one alone is accepted (the table, not a field check, rejects the pair).
  for k, v in overrides.items():
    alone = default_config()
    alone.model.num_layers = 4
    _set(alone, k, v)
    if k == "parallel.expert":
      alone.moe.num_experts = 2
    assert _error_key(alone) is None, k


def test_rlhf_rules_come_from_the_table(tiny_config):
  tiny_config.optim.name = "onebit_adam"
  assert _error_key(tiny_config) is None
  assert _error_key(tiny_config, rlhf=True) == "optim.name"


def test_every_pair_of_the_table_is_reachable():
  for a, b in COMPATIBILITY:
    assert a in TECHNIQUES and b in TECHNIQUES and a != b
    assert not TECHNIQUES[b].on(default_config(), {"stage": 1, "sequence": 1, "expert": 1},
                                False)


def test_warns_when_a_schedule_never_starts_within_the_run(caplog):
  config = default_config()
  assert config_warnings(config) == []  # the defaults are all off
  config.compression.activation_quantization.enabled = True  # DeepSpeed's offset 1000
  config.optim.name = "onebit_adam"  # DeepSpeed's freeze_step 100000
  config.steps = 300
  warnings = config_warnings(config)
  assert [w.split("=")[0] for w in warnings] == [
      "config.optim.freeze_step", "config.compression.activation_quantization.schedule_offset"]
  config.steps = 1000  # an offset at the last step still never acts
  assert len(config_warnings(config)) == 2
  config.steps = 1001
  assert len(config_warnings(config)) == 1
  config.optim.freeze_step = 100
  assert config_warnings(config) == []
  config.optim.name = "zero_one_adam"  # its own freeze: var_freeze_step
  assert [w.split("=")[0] for w in config_warnings(config)] == ["config.optim.var_freeze_step"]
  # validate logs each warning once per process.
  config.steps = 77
  with caplog.at_level(logging.WARNING):
    validate(config, 8)
    validate(config, 8)
  assert sum("var_freeze_step=100000 >= steps=77" in r.getMessage() for r in caplog.records) == 1
