"""The one error type for bad configuration, raised before anything compiles."""


class ConfigError(ValueError):
  """A config value is invalid.

  Attributes:
    key: dotted config key that is wrong, e.g. ``parallel.tensor``.
  """

  def __init__(self, key: str, message: str):
    self.key = key
    super().__init__(f"config.{key}: {message}")
