"""N:M semi-structured sparsity: magnitude masks and ADMM (NxMTransformer).

In every group of m consecutive weights along the input (reduction) dimension
of a [K, N] weight, n are kept: the layout sparse tensor cores execute (2:4).

* Magnitude: keep the n largest |w| of each group. Applied in the forward pass
  with straight-through gradients to every weight, the mask is re-chosen each
  step (SR-STE, Zhou et al. 2021, without the decay term).
* ADMM (Holmes et al. 2021, "NxMTransformer", eq. 4-6): fine-tune
  f(W) + ρ/2 ||W - Z + U||², with Z = Π_NM(W + U) and U ← U + W - Z after each
  step, then prune W to Π_NM(W).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxspeed.compression.quantizers import ste


def nm_mask(w: jax.Array, n: int, m: int) -> jax.Array:
  """bool [K, N]: the n largest |w| of each m consecutive rows of each column.

  Ties keep the earlier row.
  """
  k = w.shape[0]
  if k % m:
    raise ValueError(f"m={m} does not divide the input dimension {k} of {w.shape}")
  groups = jnp.abs(w).reshape(k // m, m, *w.shape[1:])
  rank = jnp.argsort(jnp.argsort(-groups, axis=1, stable=True), axis=1)
  return (rank < n).reshape(w.shape)


def project_nm(w: jax.Array, n: int, m: int) -> jax.Array:
  """Π_NM(w): the closest N:M-sparse matrix in Frobenius norm (magnitude pruning)."""
  return jnp.where(nm_mask(w, n, m), w, 0)


def sparsify_nm(w: jax.Array, n: int, m: int) -> jax.Array:
  """Forward: Π_NM(w); backward: identity to every weight (straight-through)."""
  return ste(w, project_nm(w, n, m))


class AdmmState(NamedTuple):
  """ADMM's auxiliary variables for each pruned weight (same tree as the weights)."""

  z: Any  # N:M-sparse copies
  u: Any  # scaled dual variables


def admm_init(weights, n: int, m: int) -> AdmmState:
  """Z = Π_NM(W), U = 0."""
  return AdmmState(jax.tree.map(lambda w: project_nm(w, n, m), weights),
                   jax.tree.map(jnp.zeros_like, weights))


def admm_penalty(weights, state: AdmmState, rho: float) -> jax.Array:
  """ρ/2 Σ ||W - Z + U||², added to the training loss."""
  terms = jax.tree.map(lambda w, z, u: jnp.sum(jnp.square(w - z + u)), weights, state.z,
                       state.u)
  return 0.5 * rho * sum(jax.tree.leaves(terms))


def admm_update(weights, state: AdmmState, n: int, m: int) -> AdmmState:
  """Z ← Π_NM(W + U); U ← U + W - Z."""
  z = jax.tree.map(lambda w, u: project_nm(w + u, n, m), weights, state.u)
  u = jax.tree.map(lambda u, w, z: u + w - z, state.u, weights, z)
  return AdmmState(z, u)
