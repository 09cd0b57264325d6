"""Real integer weights and matmuls: int8 / packed int4 storage, int8 x int8 -> int32.

A ``QuantizedWeight`` holds a [K, N] weight as signed integer codes and one
float32 scale per (K-group, column): w ≈ codes · scales, with
``scales`` [K / group_size, N]. ZeroQuant's groups of output channels are the
case group_size = K (one row of scales, equal within an output group);
GPTQ/AWQ-style int4 groups along K are group_size < K.

int4 codes are packed two per byte along K: byte [i, n] holds row 2i in its low
nibble and row 2i + 1 in its high nibble, each as a two's-complement 4-bit value.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxspeed.compression.quantizers import symmetric_codes, symmetric_scale
from pallas_kernels import quant_matmul as kernels
from pallas_kernels.quant_matmul import unpack_int4


def pack_int4(codes: jax.Array) -> jax.Array:
  """int8 codes in [-8, 7], [K, N] with K even -> uint8 [K/2, N]."""
  if codes.shape[0] % 2:
    raise ValueError(f"int4 packing needs an even first dimension, got {codes.shape}")
  nibbles = codes.astype(jnp.uint8) & 0xF
  return nibbles[0::2] | (nibbles[1::2] << 4)


@flax.struct.dataclass
class QuantizedWeight:
  """A [K, N] weight as integer codes and float32 scales.

  Attributes:
    codes: int8 [K, N] (bits = 8) or uint8 [K/2, N] packed int4 (bits = 4).
    scales: float32 [K / group_size, N].
    bits: 8 or 4.
  """

  codes: jax.Array
  scales: jax.Array
  bits: int = flax.struct.field(pytree_node=False, default=8)

  @property
  def shape(self) -> tuple[int, int]:
    k = self.codes.shape[0] * (2 if self.bits == 4 else 1)
    return k, self.codes.shape[1]

  @property
  def group_size(self) -> int:
    return self.shape[0] // self.scales.shape[0]

  @property
  def nbytes(self) -> int:
    return self.codes.nbytes + self.scales.nbytes

  def int8_codes(self) -> jax.Array:
    """int8 [K, N] (int4 codes unpacked)."""
    return unpack_int4(self.codes) if self.bits == 4 else self.codes

  def dequantize(self) -> jax.Array:
    """float32 [K, N]."""
    k, n = self.shape
    codes = self.int8_codes().astype(jnp.float32).reshape(-1, self.group_size, n)
    return (codes * self.scales[:, None, :]).reshape(k, n)


def quantize_to_int(w: jax.Array, bits: int, *, out_groups: int = 1,
                    group_size: int | None = None) -> QuantizedWeight:
  """Symmetric integer codes of a [K, N] weight (the formulas of ``quantizers``).

  Args:
    w: float [K, N].
    bits: 8 or 4.
    out_groups: output channels split into this many contiguous groups sharing a
      range (ZeroQuant's ``quantize_groups``).
    group_size: rows of K sharing a range; K (None) for one range over K.

  Returns:
    The codes and scales; ``dequantize()`` equals ``quantize_weight(w, bits,
    out_groups)`` when group_size is None.
  """
  if bits not in (4, 8):
    raise ValueError(f"integer weights are 8 or 4 bits, got {bits}")
  k, n = w.shape
  group_size = group_size or k
  if k % group_size or n % out_groups:
    raise ValueError(f"group_size={group_size} must divide K={k} and out_groups={out_groups} "
                     f"N={n}")
  blocks = w.astype(jnp.float32).reshape(k // group_size, group_size, out_groups, n // out_groups)
  absmax = jnp.max(jnp.abs(blocks), axis=(1, 3), keepdims=True)
  scale = symmetric_scale(absmax, bits)
  codes = symmetric_codes(blocks, scale, bits).reshape(k, n).astype(jnp.int8)
  scales = jnp.broadcast_to(scale[:, 0], (k // group_size, out_groups, n // out_groups))
  codes = pack_int4(codes) if bits == 4 else codes
  return QuantizedWeight(codes, scales.reshape(k // group_size, n), bits)


def quantize_tokens_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Token-wise symmetric int8 codes of activations.

  Args:
    x: float [M, K].

  Returns:
    (int8 codes [M, K], float32 scales [M]).
  """
  x = x.astype(jnp.float32)
  scale = symmetric_scale(jnp.max(jnp.abs(x), axis=1, keepdims=True), 8)
  return symmetric_codes(x, scale, 8).astype(jnp.int8), scale[:, 0]


def int8_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """int8 [M, K] @ int8 [K, N] -> int32 [M, N], accumulated in int32."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def quantized_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
  """x [..., K] float @ w (integer) -> float32 [..., N], with token-wise int8 activations.

  On GPU the Pallas kernels of ``pallas_kernels.quant_matmul`` run the integer
  dot and the rescale in one pass; elsewhere the same arithmetic runs as XLA
  integer dots.
  """
  lead = x.shape[:-1]
  codes, scales = quantize_tokens_int8(x.reshape(-1, x.shape[-1]))
  if kernels.use_pallas():
    if w.bits == 4:
      y = kernels.w4a8_matmul(codes, scales, w.codes, w.scales)
    else:
      y = kernels.w8a8_matmul(codes, scales, w.codes, w.scales)
  else:
    y = kernels.w8a8_matmul_reference(codes, scales, w.int8_codes(), w.scales)
  return y.reshape(*lead, w.shape[1])


def tree_nbytes(tree) -> int:
  """Bytes of all array leaves of a pytree (QuantizedWeights count codes + scales)."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
