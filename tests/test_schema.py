"""The config schema: every error names a real key, and the checks no run can slip past."""

import ast
import pathlib

import ml_collections

from jaxspeed.config import default_config

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
  assert len(named) > 100  # the scan sees the package's errors
  bad = []
  for where, key, is_prefix in named:
    # An f-string prefix "a.b." must be a section; "a.b_" would be a partial name.
    ok = key.rstrip(".") in paths if is_prefix and key.endswith(".") else key in paths
    if not ok:
      bad.append(f"{where}: {key!r}")
  assert not bad, "ConfigError names keys that are not in default_config():\n" + "\n".join(bad)
