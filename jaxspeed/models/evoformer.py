"""A small Evoformer block (AlphaFold 2, Jumper et al. 2021, Suppl. Alg. 6).

The MSA representation m [B, S, R, c_m] (S sequences, R residues) and the pair
representation z [B, R, R, c_z] update each other:

  m += row attention with pair bias (Alg. 7); m += column attention (Alg. 8);
  m += transition (Alg. 9); z += outer product mean (Alg. 10);
  z += triangular multiplicative update, outgoing edges (Alg. 11);
  z += triangular attention around the starting node (Alg. 13); z += transition.

Every attention is ``evoformer_attention`` (rows broadcast the pair bias, no
[B, rows, H, N, N] logits are kept). Parameters and activations carry logical
axes (``heads`` and ``mlp`` split over ``tensor``, ``batch`` over the data
axes); nothing here knows the mesh. Dropout is omitted.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.models.evoformer_attention import evoformer_attention
from jaxspeed.models.layers import LayerNorm, constrain, param_init, zeros_init


class GatedAttention(nn.Module):
  """Gated multi-head attention over the last-but-one axis of x [B, rows, N, c] (Alg. 7/8/13).

  ``pair_bias``: [B, 1, H, N, N] added to every row's logits, or None.
  """

  heads: int
  head_dim: int

  @nn.compact
  def __call__(self, x: jax.Array, pair_bias: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    qkvg = self.param("qkvg", param_init(("embed", None, "heads", "kv")),
                      (c, 4, self.heads, self.head_dim))
    q, k, v, g = (jnp.einsum("brnc,chd->brnhd", x, qkvg[:, i]) for i in range(4))
    q, k, v = (constrain(t, ("batch", None, None, "heads", "kv")) for t in (q, k, v))
    o = evoformer_attention(q, k, v, pair_bias=pair_bias) * jax.nn.sigmoid(g)
    out = self.param("out", param_init(("heads", "kv", "embed")), (self.heads, self.head_dim, c))
    return jnp.einsum("brnhd,hdc->brnc", o, out)


class PairBias(nn.Module):
  """Per-head bias from the pair representation: z [B, N, N, c_z] -> [B, 1, H, N, N]."""

  heads: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    w = self.param("w", param_init(("embed", "heads")), (z.shape[-1], self.heads))
    return jnp.einsum("bijc,ch->bhij", LayerNorm()(z), w)[:, None]


class Transition(nn.Module):
  """LayerNorm, Linear to 4c, ReLU, Linear back (Alg. 9/15)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    w1 = self.param("w1", param_init(("embed", "mlp")), (c, 4 * c))
    w2 = self.param("w2", param_init(("mlp", "embed")), (4 * c, c))
    h = jax.nn.relu(LayerNorm()(x) @ w1)
    return constrain(h, ("batch", None, None, "mlp")) @ w2


class OuterProductMean(nn.Module):
  """z[i, j] += Linear(mean_s a[s, i] ⊗ b[s, j]) (Alg. 10). m [B, S, R, c_m] -> [B, R, R, c_z]."""

  c_z: int
  hidden: int = 8

  @nn.compact
  def __call__(self, m: jax.Array) -> jax.Array:
    ab = self.param("ab", param_init(("embed", None, None)), (m.shape[-1], 2, self.hidden))
    m = LayerNorm()(m)
    a, b = (jnp.einsum("bsrc,ch->bsrh", m, ab[:, i]) for i in range(2))
    outer = jnp.einsum("bsih,bsjk->bijhk", a, b) / m.shape[1]
    w = self.param("w", param_init((None, None, "embed")), (self.hidden, self.hidden, self.c_z))
    bias = self.param("bias", zeros_init(("embed",)), (self.c_z,))
    return jnp.einsum("bijhk,hkc->bijc", outer, w) + bias


class TriangleMultiplication(nn.Module):
  """Outgoing edges: z[i, j] += g ⊙ Linear(LN(Σ_k a[i, k] ⊙ b[j, k])) (Alg. 11)."""

  hidden: int = 16

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    c = z.shape[-1]
    z = LayerNorm()(z)
    proj = self.param("proj", param_init(("embed", None, "mlp")), (c, 4, self.hidden))
    a, a_gate, b, b_gate = (jnp.einsum("bijc,ch->bijh", z, proj[:, i]) for i in range(4))
    a, b = a * jax.nn.sigmoid(a_gate), b * jax.nn.sigmoid(b_gate)
    edges = jnp.einsum("bikh,bjkh->bijh", a, b)
    w = self.param("w", param_init(("mlp", "embed")), (self.hidden, c))
    gate = self.param("gate", param_init(("embed", None)), (c, c))
    return jax.nn.sigmoid(z @ gate) * (LayerNorm()(edges) @ w)


class EvoformerBlock(nn.Module):
  """One Evoformer block: (m [B, S, R, c_m], z [B, R, R, c_z]) -> the same shapes."""

  heads: int = 4
  head_dim: int = 8

  @nn.compact
  def __call__(self, m: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    m = constrain(m, ("batch", None, None, "embed"))
    z = constrain(z, ("batch", None, None, "embed"))
    attend = lambda name: GatedAttention(self.heads, self.head_dim, name=name)
    # MSA row attention: rows are sequences, each attends over residues with the pair bias.
    m = m + attend("row_attention")(LayerNorm()(m), PairBias(self.heads)(z))
    # Column attention: rows are residues, each attends over sequences.
    columns = jnp.swapaxes(LayerNorm()(m), 1, 2)
    m = m + jnp.swapaxes(attend("column_attention")(columns), 1, 2)
    m = m + Transition(name="msa_transition")(m)
    z = z + OuterProductMean(z.shape[-1])(m)
    z = z + TriangleMultiplication()(z)
    # Triangular attention, starting node: row i attends over j with bias from z[j, k].
    z = z + attend("triangle_attention")(LayerNorm()(z), PairBias(self.heads)(z))
    z = z + Transition(name="pair_transition")(z)
    return m, z
