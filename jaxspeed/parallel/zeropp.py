"""ZeRO++'s quantized weight all-gather, qwZ (Wang et al. 2023, arXiv 2306.10209, §3.1).

Under ZeRO-3 every device holds a slice of each parameter, split along one
dimension over the data axes (``jaxspeed.parallel.rules.zero_spec``), and the
step all-gathers the slices where the parameter is used. qwZ quantizes each
slice to int8 before the all-gather and dequantizes after, so the gather moves
1 byte per element (plus the scales) instead of 4 (float32) or 2 (bf16).

The scales are per block: one per index of the split dimension, over all the
other dimensions. Each block then lies on one device, so quantizing needs no
communication, and a block holds the other dimensions' elements (hundreds to a
few thousand here; DeepSpeed keeps its groups under 8k elements). The gather
is a straight-through estimator: its gradient is the gradient of the gathered
weight, reduced onto the slices as for an exact gather. One-dimensional
parameters (biases, LayerNorm) are gathered exactly: their scales would cost
as much as their values. So are the token embedding and LM head
(``EXACT_PARAMS``): the logits are read straight off them, and quantizing them
moved the loss most (``experiments.zeropp``: 300 steps of ``gpt_tiny`` end 2.6%
above exact ZeRO-3 with them quantized, 0.82% without).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxspeed.compression.quantizers import symmetric_codes, symmetric_scale

QWZ_BITS = 8
EXACT_PARAMS = ("embed", "lm_head")  # top-level parameter names gathered exactly


def split_dim(sharded: P, gathered: P, ndim: int) -> int | None:
  """The dimension ZeRO split: where ``sharded`` (the ZeRO-3 spec) differs from
  ``gathered`` (the same tensor's tensor-parallel spec), or None."""
  pad = lambda spec: list(spec) + [None] * (ndim - len(spec))
  return next((i for i, (s, g) in enumerate(zip(pad(sharded), pad(gathered))) if s != g), None)


def quantize_blocks(x: jax.Array, dim: int) -> tuple[jax.Array, jax.Array]:
  """int8 codes of ``x`` and float32 scales, one per index of dimension ``dim``.

  Returns:
    (codes: int8, ``x``'s shape; scales: float32, 1 along every dimension but ``dim``).
  """
  others = tuple(i for i in range(x.ndim) if i != dim)
  absmax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=others, keepdims=True)
  scale = symmetric_scale(absmax, QWZ_BITS)
  return symmetric_codes(x.astype(jnp.float32), scale, QWZ_BITS).astype(jnp.int8), scale


def quantized_all_gather(x: jax.Array, sharded: NamedSharding, gathered: NamedSharding,
                         dim: int) -> jax.Array:
  """``x`` (placed as ``sharded``, split along ``dim``) all-gathered to ``gathered`` in int8,
  dequantized to ``x``'s dtype; the gradient passes straight through to the slices."""

  @jax.custom_vjp
  def gather(x):
    codes, scale = quantize_blocks(jax.lax.with_sharding_constraint(x, sharded), dim)
    # Pinned on both sides, the reshard (the all-gather) must move the int8 codes: with
    # only the gathered side pinned, the partitioner may gather the float32 values.
    codes = jax.lax.with_sharding_constraint(codes, sharded)
    codes = jax.lax.with_sharding_constraint(codes, gathered)
    scale = jax.lax.with_sharding_constraint(scale, NamedSharding(gathered.mesh, P()))
    return (codes.astype(jnp.float32) * scale).astype(x.dtype)

  def forward(x):
    return gather(x), None

  def backward(_, grad):
    return (jax.lax.with_sharding_constraint(grad, sharded),)

  gather.defvjp(forward, backward)
  return gather(x)


def qwz_gather(params: Any, specs: Any, gathered_specs: Any, mesh: Mesh) -> Any:
  """Every ZeRO-split parameter of ``params`` (placed by ``specs``, PartitionSpecs) gathered
  to ``gathered_specs`` (its tensor-parallel specs) with ``quantized_all_gather``, except
  ``EXACT_PARAMS``; the others as they are."""

  def leaf(x, spec, gathered):
    dim = split_dim(spec, gathered, x.ndim)
    if dim is None or x.ndim < 2:
      return x
    return quantized_all_gather(x, NamedSharding(mesh, spec), NamedSharding(mesh, gathered),
                                dim)

  quantized = {name: jax.tree.map(leaf, tree, specs[name], gathered_specs[name],
                                  is_leaf=lambda s: isinstance(s, P))
               for name, tree in params.items() if name not in EXACT_PARAMS}
  return {**params, **quantized}
