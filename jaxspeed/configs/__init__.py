"""Configs that ship with the package; ``--config=NAME`` in the console scripts finds them.

Each module has ``get_config()`` returning a ``jaxspeed.default_config()`` with
its fields overridden. The repository's ``configs/*.py`` re-export them, so
``--config=configs/gpt_tiny.py`` works from a checkout.
"""

import os

NAMES = ("demo", "gpt_tiny", "gpt3_1p3b", "rlhf_tiny")


def path(name: str) -> str:
  """The file of the packaged config ``name`` (for ``config_flags``)."""
  return os.path.join(os.path.dirname(__file__), f"{name}.py")
