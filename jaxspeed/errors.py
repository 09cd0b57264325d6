"""The one error type for bad configuration, raised before anything compiles."""


class ConfigError(ValueError):
  """A config value is invalid.

  Attributes:
    key: dotted config key that is wrong, e.g. ``parallel.tensor``.
  """

  def __init__(self, key: str, message: str):
    self.key = key
    super().__init__(f"config.{key}: {message}")


class FlagError(ValueError):
  """A command-line flag outside the config is invalid (e.g. ``--workdir``).

  Attributes:
    flag: the flag's name without dashes, e.g. ``workdir``.
    message: what is wrong with it.
  """

  def __init__(self, flag: str, message: str):
    self.flag, self.message = flag, message
    super().__init__(f"--{flag}: {message}")


class RunError(RuntimeError):
  """A run had to stop (it diverged, a checkpoint failed to save); the message says why."""
