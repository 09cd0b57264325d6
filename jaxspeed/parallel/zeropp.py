"""ZeRO++ (Wang et al. 2023, arXiv 2306.10209): qwZ (§3.1), hpZ (§3.2) and qgZ (§3.3),
and the explicit ZeRO-3 gather they change.

These functions run on one device's slices, inside a ``jax.shard_map`` manual
over the data axes (the step's per-device gradient computation,
``jaxspeed.training.step``). Under ZeRO-3 every device holds a slice of each
parameter, split along one dimension over the data axes
(``jaxspeed.parallel.rules.zero_spec``); ``Zero3Gather`` all-gathers the
slices over exactly those axes, and the gradient, its transpose, is a
reduce-scatter onto the slices, summed in float32.

qwZ, the quantized weight all-gather: each slice is quantized to int8 before
the gather and dequantized after, so the gather moves 1 byte per element (plus
the scales) instead of 4 (float32) or 2 (bf16). The scales are per block: one
per index of the split dimension, over all the other dimensions. Each block
then lies on one device, so quantizing needs no communication, and a block
holds the other dimensions' elements (hundreds to a few thousand here;
DeepSpeed keeps its groups under 8k elements). The gather is a straight-
through estimator: its gradient is the exact gather's. One-dimensional
parameters (biases, LayerNorm) are gathered exactly: their scales would cost
as much as their values. So are the token embedding and LM head
(``EXACT_PARAMS``): the logits are read straight off them, and quantizing them
moved the loss most (``experiments.zeropp``: 300 steps of ``gpt_tiny`` end 2.6%
above exact ZeRO-3 with them quantized, 0.82% without).

hpZ, hierarchical weight partitioning: the mesh's ``fsdp`` axis lies inside a
node and ``data`` across nodes (``CROSS_NODE_AXES``). ZeRO-3 splits each
parameter over both, so its gather crosses nodes with every byte. hpZ gathers
in two levels: over ``data`` first, into a secondary copy split over ``fsdp``
only (1/fsdp of the parameter per device instead of 1/(data·fsdp)), then
inside the node. Its transpose reduces the gradient the same way round: inside
the node first, then across nodes with 1/fsdp of the bytes.

qgZ, the quantized gradient reduce-scatter: a reduce-scatter that crosses nodes
(the only one, or with hpZ the second level) becomes one all-to-all of int4
codes (packed two per byte, one float32 scale per ``QGZ_GROUP`` elements), each
device summing the chunks it receives in float32 (``quantized_reduce_scatter``):
about 1/8 of the float32 bytes. The paper quantizes the intra-node level too;
here it stays exact, where bandwidth is plentiful. No error feedback: each
step's rounding error is lost, as in the paper.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxspeed.compression.integer import pack_int4
from jaxspeed.compression.quantizers import symmetric_codes, symmetric_scale
from jaxspeed.parallel.mesh import spec_axes
from pallas_kernels.quant_matmul import unpack_int4

QWZ_BITS = 8
QGZ_BITS = 4
# Elements per qgZ scale: with 256, 300 steps of ``gpt_tiny`` ended 1.2% above exact
# ZeRO-3 (``experiments.zeropp``); with 64, 0.46%, for 1/16 more bytes.
QGZ_GROUP = 64
EXACT_PARAMS = ("embed", "lm_head")  # top-level parameter names gathered exactly
CROSS_NODE_AXES = ("data",)  # the mesh axes between nodes; ``fsdp`` lies inside one


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


def quantized_reduce_scatter(x: jax.Array, dim: int, axes: tuple[str, ...]) -> jax.Array:
  """``psum_scatter(x, axes, scatter_dimension=dim, tiled=True)`` in float32, exchanged
  as int4 codes with one scale per ``QGZ_GROUP`` elements (qgZ).

  The chunks of ``dim`` (one per device of ``axes``, major to minor) are quantized
  here, exchanged with one all-to-all, and summed where they arrive.
  """
  n = math.prod(jax.lax.axis_size(a) for a in axes)
  moved = jnp.moveaxis(x.astype(jnp.float32), dim, 0)
  chunk_shape = (moved.shape[0] // n, *moved.shape[1:])
  chunks = moved.reshape(n, -1)  # [n, m]
  m = chunks.shape[1]
  padded = -(-m // QGZ_GROUP) * QGZ_GROUP
  groups = jnp.pad(chunks, ((0, 0), (0, padded - m))).reshape(n, padded // QGZ_GROUP,
                                                                 QGZ_GROUP)
  scale = symmetric_scale(jnp.max(jnp.abs(groups), axis=2, keepdims=True), QGZ_BITS)
  codes = symmetric_codes(groups, scale, QGZ_BITS).astype(jnp.int8).reshape(n, padded)
  packed = pack_int4(codes.T)  # [padded / 2, n]: chunk j is column j
  exchange = lambda a: jax.lax.all_to_all(a, axes, split_axis=1, concat_axis=1, tiled=True)
  packed, scale = exchange(packed), exchange(scale[:, :, 0].T)  # column j: from device j
  received = unpack_int4(packed).astype(jnp.float32).reshape(padded // QGZ_GROUP, QGZ_GROUP, n)
  summed = jnp.sum(received * scale[:, None, :], axis=2).reshape(padded)[:m]
  return jnp.moveaxis(summed.reshape(chunk_shape), 0, dim)


def _reduce_scatter(grad: jax.Array, dim: int, axes: tuple[str, ...],
                    quantized: bool) -> jax.Array:
  """The gradient's reduce-scatter onto the slices, in float32 (XLA:CPU also fails to
  compile a bfloat16 one); with qgZ (``quantized``) if it crosses nodes."""
  if quantized and any(a in CROSS_NODE_AXES for a in axes):
    summed = quantized_reduce_scatter(grad, dim, axes)
  else:
    summed = jax.lax.psum_scatter(grad.astype(jnp.promote_types(grad.dtype, jnp.float32)),
                                  axes, scatter_dimension=dim, tiled=True)
  return summed.astype(grad.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def all_gather_slices(local: jax.Array, dim: int, axes: tuple[str, ...], quantized: bool,
                      quantized_grad: bool = False) -> jax.Array:
  """The slices of ``axes`` concatenated along ``dim`` (in int8 with block scales if
  ``quantized``); the gradient is reduce-scattered back onto the slices (``_reduce_scatter``,
  with qgZ if ``quantized_grad``)."""
  if not quantized:
    return jax.lax.all_gather(local, axes, axis=dim, tiled=True)
  codes, scale = quantize_blocks(local, dim)
  codes, scale = (jax.lax.all_gather(a, axes, axis=dim, tiled=True) for a in (codes, scale))
  return (codes.astype(jnp.float32) * scale).astype(local.dtype)


def _gather_forward(local, dim, axes, quantized, quantized_grad):
  return all_gather_slices(local, dim, axes, quantized, quantized_grad), None


def _gather_backward(dim, axes, quantized, quantized_grad, _, grad):
  del quantized  # straight through: the exact gather's gradient
  # The gathered value has the slices' dtype, so the gradient does.
  return (_reduce_scatter(grad, dim, axes, quantized_grad),)


all_gather_slices.defvjp(_gather_forward, _gather_backward)


def _reorder_blocks(x: jax.Array, dim: int, order: tuple[str, ...], target: tuple[str, ...],
                    sizes: Mapping[str, int]) -> jax.Array:
  """``x`` whose ``dim`` holds one block per device of ``order`` (major to minor),
  rearranged into the block order of ``target`` (the same axes)."""
  if order == target:
    return x
  blocks = [sizes[a] for a in order]
  shape = x.shape
  x = x.reshape(*shape[:dim], *blocks, shape[dim] // math.prod(blocks), *shape[dim + 1:])
  perm = [order.index(a) for a in target]
  x = jnp.moveaxis(x, [dim + p for p in perm], list(range(dim, dim + len(perm))))
  return x.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Zero3Gather:
  """How the per-device step gathers its ZeRO-3 slices over the ``manual_axes`` that split
  them (``mesh_sizes``: the mesh's axis sizes).

  With ``hierarchical`` (hpZ) a gather has two levels: across nodes into the secondary
  copy, then inside the node; ``level`` picks ``cross_node`` (the first; nothing without
  hpZ), ``node`` (the rest, from the result of ``cross_node``) or ``all``. qwZ
  (``quantized``) quantizes the gather that crosses nodes, qgZ (``quantized_grad``) the
  gradient's reduce-scatter that crosses nodes: the only ones, or hpZ's first level.
  Both spare one-dimensional parameters, and qwZ ``EXACT_PARAMS``.
  """

  mesh_sizes: Mapping[str, int]
  manual_axes: tuple[str, ...]
  quantized: bool = False
  hierarchical: bool = False
  quantized_grad: bool = False

  def leaf(self, x: jax.Array, spec: P, gathered: P, level: str = "all",
           exact: bool = False) -> jax.Array:
    """One parameter's slice (placed by ``spec``) gathered to ``gathered`` (its
    tensor-parallel spec); ``exact`` turns qwZ off for it."""
    dim = split_dim(spec, gathered, x.ndim)
    if dim is None:
      return x
    axes = tuple(a for a in spec_axes(spec[dim]) if a in self.manual_axes)
    cross = tuple(a for a in axes if a in CROSS_NODE_AXES)
    node = tuple(a for a in axes if a not in CROSS_NODE_AXES)
    quantized = self.quantized and not exact and x.ndim >= 2
    quantized_grad = self.quantized_grad and x.ndim >= 2
    if not (self.hierarchical and cross and node):
      if level == "cross_node":
        return x
      return all_gather_slices(x, dim, axes, quantized, quantized_grad)
    if level != "node":
      x = all_gather_slices(x, dim, cross, quantized, quantized_grad)
    if level == "cross_node":
      return x
    full = all_gather_slices(x, dim, node, False)
    return _reorder_blocks(full, dim, node + cross, axes, self.mesh_sizes)

  def tree(self, params: Any, specs: Any, gathered_specs: Any, level: str = "all") -> Any:
    """``leaf`` over the parameter tree ``{name: tree}`` and its specs."""
    def gather(name):
      return lambda x, spec, gathered: self.leaf(x, spec, gathered, level,
                                                 exact=name in EXACT_PARAMS)
    return {name: jax.tree.map(gather(name), tree, specs[name], gathered_specs[name],
                               is_leaf=lambda s: isinstance(s, P))
            for name, tree in params.items()}
