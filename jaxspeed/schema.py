"""Config sections as frozen dataclasses: one place for each default and each field check.

A technique declares its section of the config once, as a frozen dataclass
deriving from ``Section`` whose fields are ``setting(...)``: the default and
the allowed values. ``to_config_dict`` turns the dataclass into the
``ml_collections.ConfigDict`` that ``jaxspeed.config.default_config`` serves;
``from_config`` reads a section back, and construction checks every field
(choices, bounds, finiteness), raising ``ConfigError`` with the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Container, Mapping
from typing import Any, ClassVar, TypeVar

import ml_collections

from jaxspeed.errors import ConfigError

S = TypeVar("S", bound="Section")


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
            choices: Container | None = None, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None,
            config: bool = True) -> Any:
  """A dataclass field with its allowed values.

  Args:
    default: the default value (``factory`` instead for lists and nested sections).
    factory: builds the default: a nested ``Section`` class, or e.g. ``lambda: [0]``.
    choices: the allowed values (any container; a registry dict is read at check time).
    ge, gt, le, lt: numeric bounds, value >= ge, > gt, <= le, < lt.
    config: False for a field that is not a config key (set by code, not by users).
  """
  metadata = dict(choices=choices, ge=ge, gt=gt, le=le, lt=lt, config=config)
  return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


# Bound name -> (test, the bound as a comparison, as an interval end).
_BOUNDS = {"ge": (operator.ge, ">=", "["), "gt": (operator.gt, ">", "("),
           "le": (operator.le, "<=", "]"), "lt": (operator.lt, "<", ")")}


def _allowed_range(bounds: dict[str, float]) -> str:
  """E.g. "must be > 0" or "must be in [0, 1)"."""
  if len(bounds) == 1:
    (name, bound), = bounds.items()
    return f"must be {_BOUNDS[name][1]} {bound}"
  (low, a), (high, b) = sorted(bounds.items(), key=lambda nb: nb[0][0] == "l")
  return f"must be in {_BOUNDS[low][2]}{a}, {b}{_BOUNDS[high][2]}"


def check_field(key: str, value: Any, meta: Mapping[str, Any]) -> None:
  """Raises ``ConfigError(key)`` if ``value`` breaks the field's choices, bounds or finiteness."""
  choices = meta.get("choices")
  if choices is not None and value not in choices:
    raise ConfigError(key, f"got {value!r}; allowed values: {', '.join(map(str, choices))}")
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(key, f"must be a finite number, got {value!r}")
  bounds = {name: meta[name] for name in _BOUNDS if meta.get(name) is not None}
  if not bounds:
    return
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise ConfigError(key, f"must be a number, got {value!r}")
  if not all(_BOUNDS[name][0](value, bound) for name, bound in bounds.items()):
    raise ConfigError(key, f"{_allowed_range(bounds)}, got {value!r}")


def config_fields(cls_or_obj) -> list[dataclasses.Field]:
  """The fields of a section that are config keys."""
  return [f for f in dataclasses.fields(cls_or_obj) if f.metadata.get("config", True)]


def check_fields(obj, key: str) -> None:
  """Checks every config field of dataclass ``obj``, whose dotted config path is ``key``."""
  for f in config_fields(obj):
    value = getattr(obj, f.name)
    if not isinstance(value, Section):  # a nested section checked itself when built
      check_field(f"{key}.{f.name}" if key else f.name, value, f.metadata)


def _nested(f: dataclasses.Field) -> type[Section] | None:
  factory = f.default_factory
  return factory if isinstance(factory, type) and issubclass(factory, Section) else None


class Section:
  """Base of a frozen config dataclass; ``KEY`` is its dotted path in the config.

  Subclasses are ``@dataclasses.dataclass(frozen=True)`` with ``setting`` fields
  and may override ``check`` for rules across their own fields.
  """

  KEY: ClassVar[str] = ""

  def __post_init__(self):
    check_fields(self, self.KEY)
    self.check()

  def check(self) -> None:
    """Rules across this section's fields; raises ``ConfigError``. None by default."""

  @classmethod
  def from_config(cls: type[S], section: Mapping[str, Any]) -> S:
    """Reads (and checks) the section from its ``ConfigDict`` (or dict); keys it lacks keep
    their defaults."""
    values = {}
    for f in config_fields(cls):
      if f.name not in section:
        continue
      nested = _nested(f)
      values[f.name] = nested.from_config(section[f.name]) if nested else section[f.name]
    return cls(**values)


def to_config_dict(cls: type[Section]) -> ml_collections.ConfigDict:
  """The section's defaults as a ``ConfigDict``, nested sections as nested ``ConfigDict``s."""
  c = ml_collections.ConfigDict()
  for f in config_fields(cls):
    nested = _nested(f)
    if nested:
      c[f.name] = to_config_dict(nested)
    elif f.default_factory is not dataclasses.MISSING:
      c[f.name] = f.default_factory()
    else:
      c[f.name] = f.default
  return c
