"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al. 2023) for any attention function.

Outside attention, activations are split along the sequence over the
``sequence`` mesh axis. Attention needs every key for every query, so before
it one all-to-all per tensor trades the sequence split for a head split:
[B, S/P, H, D] -> [B, S, H/P, D]; each device then attends over the full
sequence for its H/P heads, and the inverse all-to-all brings the output back
to [B, S/P, H, D]. Per device each all-to-all moves (P-1)/P of its local
B·(S/P)·H·D block: constant when S and P grow together (the paper's claim),
unlike all-gathering the keys and values, which moves (P-1)/P of the full
B·S·H·D.

Grouped-query attention with fewer kv heads per device than P replicates each
kv head P/kv times before the exchange, as ALST (Bekman et al. 2025) does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxspeed.parallel.mesh import spec_axes

SEQUENCE_AXIS = "sequence"


def sequence_parallel_size() -> int:
  """Ulysses' degree P: the ``sequence`` axis of the mesh in context, if the
  logical rules in context split ``seq`` over it or the code runs on sequence
  shards already (``sequence`` manual, as in a pipeline stage); else 1 (e.g.
  at init)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not _on_sequence_shards() and SEQUENCE_AXIS not in spec_axes(
      nn.logical_to_mesh_axes(("seq",))[0]):
    return 1
  return mesh.shape.get(SEQUENCE_AXIS, 1)


def _on_sequence_shards() -> bool:
  """Whether ``sequence`` is a manual axis here: arrays are this device's sequence shard."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and SEQUENCE_AXIS in mesh.manual_axes



def _side_spec(x: jax.Array, batch, heads) -> P:
  """Spec of a bias or mask [B|1, H|1, S|1, T] after the exchange: full S and T."""
  return P(batch if x.shape[0] > 1 else None, heads if x.shape[1] > 1 else None, None, None)


def full_sequence(x: jax.Array) -> jax.Array:
  """x [..., S_local] -> [..., S]: gathered over ``sequence`` when on sequence shards.

  E.g. positions, from which ALiBi's bias over global positions is built.
  """
  if not _on_sequence_shards():
    return x
  return jax.lax.all_gather(x, SEQUENCE_AXIS, axis=x.ndim - 1, tiled=True)


def shard_key(key: jax.Array) -> jax.Array:
  """``key`` folded with this device's sequence shard when on sequence shards (so dropout
  masks differ between the shards of one sequence), else ``key``."""
  if not _on_sequence_shards():
    return key
  return jax.random.fold_in(key, jax.lax.axis_index(SEQUENCE_AXIS))


def ulysses_attention(attend, q: jax.Array, k: jax.Array, v: jax.Array, *,
                      bias: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
  """``attend(q, k, v, bias=, mask=)`` on head-sharded, full-sequence tensors.

  Call under the logical axis rules of the step and with the mesh in context
  (``jax.set_mesh`` or ``use_abstract_mesh``); the sequence dimension must be
  divisible by the ``sequence`` axis. Inside a ``shard_map`` that has made
  ``sequence`` manual already (a pipeline stage), q, k and v are the local
  sequence shards [B, S/P, ...] and the exchange runs on them directly.

  Args:
    attend: an attention function with the signature of
      ``attention.dot_product_attention`` that accepts fewer kv heads than
      query heads (grouped-query attention).
    q: [B, S, H, D] queries, sequence-sharded.
    k: [B, S, Hkv, D] keys, Hkv dividing H.
    v: [B, S, Hkv, D] values.
    bias: additive bias [B|1, H, S, S] over global positions (ALiBi), or None.
    mask: boolean [B|1, 1|H, S|1, S] over global positions, or None. A mask
      known at trace time and shared by all heads (``causal_mask``) stays a
      constant, so the attention function can still skip the blocks it
      excludes.

  Returns:
    [B, S, H, D], sequence-sharded like ``q``.
  """
  p = sequence_parallel_size()

  def local(ops):
    to_heads = lambda x: jax.lax.all_to_all(x, SEQUENCE_AXIS, 2, 1, tiled=True)
    lq, lk, lv = ops["q"], ops["k"], ops["v"]
    if lk.shape[2] % p:  # fewer local kv heads than P: replicate each to cover P
      lk, lv = (jnp.repeat(x, p // x.shape[2], axis=2) for x in (lk, lv))
    lq, lk, lv = to_heads(lq), to_heads(lk), to_heads(lv)
    out = attend(lq, lk, lv, bias=ops.get("bias"), mask=ops.get("mask"))
    return jax.lax.all_to_all(out, SEQUENCE_AXIS, 1, 2, tiled=True)

  if _on_sequence_shards():  # bias and mask: this device's heads after the exchange
    index = jax.lax.axis_index(SEQUENCE_AXIS)

    def heads_here(x):
      if x is None or x.ndim < 3 or x.shape[-3] == 1:
        return x
      x = x.reshape((1,) * (4 - x.ndim) + x.shape)
      size = x.shape[1] // p
      return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1)
    return local({"q": q, "k": k, "v": v, "bias": heads_here(bias), "mask": heads_here(mask)})
  q_spec = nn.logical_to_mesh_axes(("batch", "seq", "heads", "kv"))
  kv_spec = nn.logical_to_mesh_axes(("batch", "seq", "kv_heads", "kv"))
  batch = q_spec[0]
  heads_after = (*spec_axes(q_spec[2]), SEQUENCE_AXIS)

  operands = {"q": q, "k": k, "v": v}
  specs = {"q": q_spec, "k": kv_spec, "v": kv_spec}
  static = {}
  for name, x in (("bias", bias), ("mask", mask)):
    # A constant without a head dimension is the same on every device.
    # (As numpy: a jax constant carries the outer mesh's sharding.)
    if x is None or (not isinstance(x, jax.core.Tracer) and (x.ndim < 3 or x.shape[-3] == 1)):
      static[name] = None if x is None else np.asarray(x)
    else:
      x = x.reshape((1,) * (4 - x.ndim) + x.shape)
      operands[name], specs[name] = x, _side_spec(x, batch, heads_after)

  return jax.shard_map(lambda ops: local({**static, **ops}), in_specs=(specs,),
                       out_specs=q_spec)(operands)


def pad_to_multiple(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Right-pads every [B, S] array of a causal-LM batch so that S divides ``multiple``.

  DeepSpeed-Ulysses needs S % P == 0 (DeepSpeed issue #5177). Padding at the
  end is invisible to the real tokens of a causal model; the padded targets
  get ``loss_mask`` 0, so the loss and gradients are those of the unpadded
  batch.
  """
  seq_len = batch["inputs"].shape[1]
  extra = -seq_len % multiple
  if not extra:
    return batch
  batch = dict(batch)
  batch.setdefault("loss_mask", np.ones(batch["inputs"].shape, np.float32))
  if "positions" in batch:
    last = batch["positions"][:, -1:]
    batch["positions"] = np.concatenate([batch["positions"], last + 1 + np.arange(extra)], 1)
  return {k: v if k == "positions" else np.pad(v, ((0, 0), (0, extra))) for k, v in batch.items()}
