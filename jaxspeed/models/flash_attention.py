"""``model.attention="flash"``: the Pallas FlashAttention kernels under the mesh.

Attention is independent across batch rows and heads, so each device can run
the kernel on its own shard of both. XLA's SPMD partitioner cannot see into a
kernel (on GPU it is an opaque custom call): left to it, q, k and v would be
all-gathered and every device would attend over the whole batch. A
``shard_map`` over the mesh axes that the current logical rules give
``batch`` and ``heads`` keeps the work sharded with no collective.

The kernels run compiled on GPU and in the slow Pallas interpreter elsewhere
(for correctness); on CPU ``model.attention="blockwise"`` is the fast path.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from jaxspeed.models.attention import ATTENTION_IMPLS
from pallas_kernels.flash_attention import as_4d_bias, flash_attention, mask_to_causal_and_bias


def _shard_axes(mesh, logical: str) -> tuple[str, ...]:
  """Mesh axes of size > 1 that split ``logical`` and are still automatic here.

  Axes already manual (inside an enclosing ``shard_map``) are per-device
  already and cannot be mapped again.
  """
  axes = nn.logical_to_mesh_axes((logical,))[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.auto_axes and mesh.shape[a] > 1)


def sharded_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                            bias: jax.Array | None = None,
                            mask: jax.Array | None = None) -> jax.Array:
  """``dot_product_attention``'s interface on the flash kernels, per batch/head shard.

  The mask becomes the kernel's causal flag or a bias
  (``mask_to_causal_and_bias``: any mask is exact, ``causal_mask`` is fast).

  Args:
    q: [B, S, H, D]; k, v: [B, T, H, D].
    bias: broadcastable to [B, H, S, T] (ALiBi).
    mask: boolean, broadcastable to [B, H, S, T]; True where attention is allowed.

  Returns:
    [B, S, H, D] in the dtype of ``q``.
  """
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  causal, bias = mask_to_causal_and_bias(mask, bias, q_len, kv_len)
  if bias is not None:
    bias = as_4d_bias(bias, batch, heads, q_len, kv_len)
  attend = lambda q, k, v, bias: flash_attention(q, k, v, bias=bias, causal=causal)
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = () if mesh.empty else _shard_axes(mesh, "batch")
  head_axes = () if mesh.empty else _shard_axes(mesh, "heads")
  if not batch_axes + head_axes:
    return attend(q, k, v, bias)
  spec = P(batch_axes or None, None, head_axes or None, None)
  bias_spec = None if bias is None else P(
      batch_axes if bias.shape[0] > 1 and batch_axes else None,
      head_axes if bias.shape[1] > 1 and head_axes else None, None, None)
  # check_vma=False: pallas_call has no rule for varying-manual-axes types.
  return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, bias_spec),
                       out_specs=spec, axis_names=set(batch_axes + head_axes),
                       check_vma=False)(q, k, v, bias)


ATTENTION_IMPLS["flash"] = sharded_flash_attention
