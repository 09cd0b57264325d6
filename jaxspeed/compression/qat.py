"""Quantization-aware execution of the model's weight matmuls, selected by layer name.

A ``QuantGroup`` says which weights (regexes searched in the weight's params
path, e.g. ``layer_0/attention/query``, as DeepSpeed matches module names with
``re.search``) run with which weight and activation bits. The groups become a
``dense`` interceptor (``jaxspeed.models.layers.intercept_dense``), so the same
model code trains, evaluates or serves quantized:

* ``fake_quant_interceptor``: weights and activations fake-quantized with
  straight-through gradients (QAT, XTC, ZeroQuant's simulated accuracy);
* ``integer_interceptor``: weights stored as integer codes, activations
  quantized per token, and integer matmuls (ZeroQuant's real execution).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from jaxspeed.compression.integer import QuantizedWeight, quantized_matmul
from jaxspeed.compression.quantizers import quantize_tokenwise, quantize_weight
from jaxspeed.compression.sparsity import sparsify_nm
from jaxspeed.errors import ConfigError
from jaxspeed.models.layers import DenseInterceptor, intercept_dense, matmul

DenseInterceptorAt = Callable[[jax.Array | None], DenseInterceptor]

FLOAT_BITS = 32  # "not quantized"


@dataclasses.dataclass(frozen=True)
class QuantGroup:
  """Weights matched by ``modules`` and how they run.

  Attributes:
    modules: regexes; a weight belongs to the group if one is found in its path.
    weight_bits: 1 (binary), 2 (ternary), 3-8, or 32 for float.
    activation_bits: bits of the token-wise input quantization; 32 for float.
    groups: weight quantization groups of output channels.
    quantization_type: weights' ``symmetric`` or ``asymmetric`` (3-8 bits).
    activation_type: the same for activations.
    sparsity: (n, m) to keep n of every m weights along the input dimension
      (applied before weight quantization), or None.
  """

  modules: tuple[str, ...]
  weight_bits: int = 8
  activation_bits: int = FLOAT_BITS
  groups: int = 1
  quantization_type: str = "symmetric"
  activation_type: str = "symmetric"
  sparsity: tuple[int, int] | None = None

  def matches(self, name: str) -> bool:
    return any(re.search(m, name) for m in self.modules)


def weight_name(path: Sequence[str]) -> str:
  return "/".join(path)


def assign_groups(groups: Sequence[QuantGroup], names: Sequence[str]) -> dict[str, QuantGroup]:
  """Weight name -> its group; every pattern must match a weight, no weight two groups.

  Raises:
    ValueError: naming the pattern that matches nothing or the doubly matched weight
      (DeepSpeed also rejects a module in two groups).
  """
  for group in groups:
    for pattern in group.modules:
      if not any(re.search(pattern, n) for n in names):
        raise ValueError(f"pattern {pattern!r} matches no weight; weights are named like "
                         f"{', '.join(names[:4])}")
  plan = {}
  for name in names:
    hits = [g for g in groups if g.matches(name)]
    if len(hits) > 1:
      raise ValueError(f"weight {name!r} matches {len(hits)} quantization groups")
    if hits:
      plan[name] = hits[0]
  return plan


def fake_quant_interceptor(plan: Mapping[str, QuantGroup], weights_on: jax.Array | bool = True,
                           activations_on: jax.Array | bool = True,
                           sparsity_on: jax.Array | bool = True) -> DenseInterceptor:
  """Fake quantization (and N:M sparsity) of the planned weight matmuls.

  Args:
    plan: weight name -> its group (``assign_groups``).
    weights_on, activations_on, sparsity_on: (traced) switches, for schedule offsets.
  """
  def intercept(x: jax.Array, w: jax.Array, path: tuple[str, ...]) -> jax.Array:
    group = plan.get(weight_name(path))
    if group is None:
      return matmul(x, w)
    # Every transform passes gradients straight through, so the blends do too.
    if group.sparsity is not None:
      w = jnp.where(sparsity_on, sparsify_nm(w, *group.sparsity), w)
    if group.weight_bits < FLOAT_BITS:
      wq = quantize_weight(w, group.weight_bits, group.groups, group.quantization_type)
      w = jnp.where(weights_on, wq, w)
    if group.activation_bits < FLOAT_BITS:
      xq = quantize_tokenwise(x, group.activation_bits, group.activation_type)
      x = jnp.where(activations_on, xq, x)
    return matmul(x, w)
  return intercept


def integer_interceptor(weights: Mapping[str, QuantizedWeight]) -> DenseInterceptor:
  """Matmuls of the weights in ``weights`` (by params path) run on their integer codes."""
  def intercept(x: jax.Array, w: jax.Array, path: tuple[str, ...]) -> jax.Array:
    q = weights.get(weight_name(path))
    return matmul(x, w) if q is None else quantized_matmul(x, q).astype(x.dtype)
  return intercept


def matmul_shapes(apply: Callable, *args) -> dict[str, tuple[int, int]]:
  """Weight name -> the [K, N] shape each ``dense`` call sees, from one abstract run.

  Attention weights are stored 3-D ([d, heads, head_dim]); this records how
  the model flattens each of them for its matmul.
  """
  shapes = {}

  def record(x, w, path):
    shapes[weight_name(path)] = tuple(w.shape)
    return matmul(x, w)

  with intercept_dense(record):
    # A fresh wrapper: jax caches traces per function, and a trace of ``apply`` made
    # under this interceptor must not be reused by a later ``jax.jit(apply)``.
    jax.eval_shape(lambda *a: apply(*a), *args)
  return shapes


def plan_from_config(compression: ml_collections.ConfigDict,
                     names: Sequence[str]) -> dict[str, QuantGroup]:
  """Weight name -> QuantGroup from ``config.compression``.

  Raises:
    ValueError: for a pattern that matches no weight.
  """
  wq, aq, sp = (compression.weight_quantization, compression.activation_quantization,
                compression.sparse_pruning)
  def matched(section) -> dict:
    if not section.enabled:
      return {}
    patterns = tuple(p.strip() for p in section.modules.split(",") if p.strip())
    return assign_groups([QuantGroup(patterns)], names)

  wplan, aplan, splan = matched(wq), matched(aq), matched(sp)
  return {n: QuantGroup((n,), wq.target_bits if n in wplan else FLOAT_BITS,
                        aq.bits if n in aplan else FLOAT_BITS, wq.quantize_groups,
                        wq.quantization_type, aq.quantization_type,
                        (sp.n, sp.m) if n in splan else None)
          for n in names if n in wplan or n in aplan or n in splan}


def interceptor_from_config(compression: ml_collections.ConfigDict,
                            plan: Mapping[str, QuantGroup]) -> DenseInterceptorAt:
  """``step -> DenseInterceptor`` switching each technique on at its ``schedule_offset``.

  ``step`` None (evaluation) means the fully compressed model.
  """
  def at(step: jax.Array | None) -> DenseInterceptor:
    on = lambda section: True if step is None else step >= section.schedule_offset
    return fake_quant_interceptor(plan, on(compression.weight_quantization),
                                  on(compression.activation_quantization),
                                  on(compression.sparse_pruning))
  return at


def compression_from_config(compression: ml_collections.ConfigDict,
                            shapes: Mapping[str, tuple[int, int]]) -> DenseInterceptorAt | None:
  """The trainer's ``step -> DenseInterceptor`` for ``config.compression``, or None if off.

  Args:
    compression: ``config.compression``.
    shapes: the model's ``matmul_shapes``.

  Raises:
    ConfigError: for a pattern matching no weight, or groups / m not dividing a weight.
  """
  sections = ("weight_quantization", "activation_quantization", "sparse_pruning")
  if not any(compression[s].enabled for s in sections):
    return None
  names = list(shapes)
  for section in sections:
    try:
      plan_from_config(compression, names) if compression[section].enabled else None
    except ValueError as e:
      raise ConfigError(f"compression.{section}.modules", str(e)) from e
  plan = plan_from_config(compression, names)
  for name, group in plan.items():
    k, n = shapes[name]
    if group.weight_bits < FLOAT_BITS and n % group.groups:
      raise ConfigError("compression.weight_quantization.quantize_groups",
                        f"{group.groups} groups do not divide the {n} output channels of "
                        f"{name}")
    if group.sparsity is not None and k % group.sparsity[1]:
      raise ConfigError("compression.sparse_pruning.m", f"m={group.sparsity[1]} does not "
                        f"divide the input dimension of {name} {shapes[name]}")
  return interceptor_from_config(compression, plan)
