"""Console scripts of the installed package (``[project.scripts]`` in pyproject.toml).

  jaxspeed-train --config=gpt_tiny --workdir=runs/demo --config.steps=50
  jaxspeed-generate --workdir=runs/demo --prompt="The "
  jaxspeed-launch --num_processes=2 -- --config=gpt_tiny --workdir=runs/mp
  jaxspeed-rlhf --config=rlhf_tiny
  jaxspeed-universal --export --workdir=runs/demo --universal_dir=runs/demo_universal

Each runs the experiment module of the same job (``python -m experiments.train``
and so on) with its command line. ``--config`` takes a file path or the name of
a config packaged in ``jaxspeed.configs``; without ``--config`` the packaged
default is used, so the scripts work outside a checkout.
"""

from __future__ import annotations

import importlib
import os
import sys

from jaxspeed import configs


def resolve_config_args(args: list[str]) -> list[str]:
  """Replaces ``--config=NAME[:arg]`` of a packaged config by its file path.

  Raises:
    SystemExit(2): with one line, for a ``--config`` that is neither a file nor a name.
  """
  out = []
  for arg in args:
    if arg.startswith("--config="):
      value = arg.removeprefix("--config=")
      name, sep, extra = value.partition(":")
      if name in configs.NAMES:
        arg = f"--config={configs.path(name)}{sep}{extra}"
      elif not os.path.isfile(name):
        print(f"error: --config: {name!r} is neither a file nor a packaged config; "
              f"packaged: {', '.join(configs.NAMES)}", file=sys.stderr)
        sys.exit(2)
    out.append(arg)
  return out


def _with_default_config(args: list[str], default: str) -> list[str]:
  if any(a.startswith("--config=") for a in args):
    return args
  return [f"--config={configs.path(default)}", *args]


def _run(module: str, default: str | None) -> None:
  args = resolve_config_args(sys.argv[1:])
  if default:
    args = _with_default_config(args, default)
  elif "--" in args:  # the launcher; its job (after "--") is experiments.train unless --module
    cut = args.index("--") + 1
    if not any(a.startswith("--module") for a in args[:cut]):
      args = args[:cut] + _with_default_config(args[cut:], "gpt_tiny")
  sys.argv[1:] = args
  main = importlib.import_module(module).main
  if default is None:  # the launcher has no config of its own
    from absl import app

    app.run(main)
  else:
    from experiments import common

    common.run_app(main)


def train() -> None:
  _run("experiments.train", "gpt_tiny")


def generate() -> None:
  _run("experiments.generate", "gpt_tiny")


def rlhf() -> None:
  _run("experiments.rlhf", "rlhf_tiny")


def launch() -> None:
  _run("experiments.launch_local", None)


def universal() -> None:
  """``--config`` is optional here: only an import checks it against the exported run."""
  from experiments import common
  from experiments import universal as job

  sys.argv[1:] = resolve_config_args(sys.argv[1:])
  common.run_app(job.main)
