"""Random-LTD: random layerwise token dropping (Yao et al. 2022, arXiv 2211.11586).

Every layer except the first and the last runs on a random, sorted subset of
``r`` tokens per sequence; the other tokens skip the layer (identity). ``r``
grows from ``min_value`` to the full sequence over training. See
``shared/reference/deepspeed-algorithms.md`` §5 for DeepSpeed's version.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxspeed.models.layers import constrain


def kept_length_at(step: int, min_value: int, max_value: int, require_steps: int,
                   seq_per_step: int) -> int:
  """Tokens kept per sequence at ``step``: DeepSpeed's ``fixed_linear`` schedule.

  r(t) = ⌊(t / require_steps)·(max − min) + min⌋, rounded down to a multiple
  of ``seq_per_step`` and capped at ``max_value`` (reference §5(b)1). Computed
  in integers, so there is no float rounding at multiples. Two deviations,
  which matter only when ``min_value`` or ``max_value`` is not a multiple of
  ``seq_per_step``: the result is never below ``min_value`` (DeepSpeed can
  round below it), and ``max_value`` is reached at ``require_steps`` (DeepSpeed
  would stay at the multiple below it and never stop dropping).
  """
  if not 0 < min_value <= max_value or require_steps <= 0 or seq_per_step <= 0:
    raise ValueError(f"random_ltd schedule: need 0 < min_value={min_value} <= "
                     f"max_value={max_value}, require_steps={require_steps} > 0 and "
                     f"seq_per_step={seq_per_step} > 0")
  if step >= require_steps:
    return max_value
  length = min_value + max(step, 0) * (max_value - min_value) // require_steps
  length -= length % seq_per_step
  return min(max(length, min_value), max_value)


def layer_tokens(kept: int, seq_len: int, num_layers: int) -> int:
  """Layer-tokens one sequence costs per step: 2·S + (L − 2)·r.

  The first and last layers see all S tokens; the rest see ``kept`` (r). This
  is what a layer-token learning-rate schedule counts (reference §5(b)7).
  """
  dropping = max(num_layers - 2, 0)
  return (num_layers - dropping) * seq_len + dropping * min(kept, seq_len)


def active_kept_length(kept: int | None, seq_len: int) -> int | None:
  """``kept`` if Random-LTD drops tokens at this length, else None (all tokens kept)."""
  if kept is None or kept >= seq_len:
    return None
  if kept < 1:
    raise ValueError(f"random_ltd_kept={kept}; must be >= 1")
  return kept


def drops_tokens(layer: int, num_layers: int) -> bool:
  """Whether 0-based ``layer`` is a Random-LTD layer: all but the first and last."""
  return 0 < layer < num_layers - 1


def sample_kept_indices(rng: jax.Array, batch: int, seq_len: int, kept: int) -> jax.Array:
  """A uniformly random subset of ``kept`` token indices per row, sorted.

  The ``kept`` smallest of i.i.d. uniform noise are a uniform subset without
  replacement; sorting keeps the tokens in order, so a causal mask over the
  kept tokens is the plain [r, r] lower triangle.

  Returns:
    int32 [batch, kept], each row strictly increasing in [0, seq_len).
  """
  # Whole rows per device, so the sorts stay local to a batch shard (XLA
  # does not split lax.top_k over the batch; it would gather the noise).
  noise = constrain(jax.random.uniform(rng, (batch, seq_len)), ("batch", None))
  idx = jnp.argsort(noise, axis=-1)[:, :kept]
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


# Per-row (vmapped) gathers and scatters lower to XLA ops with an explicit
# batch dimension, which the SPMD partitioner keeps local to a batch shard.
def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, S, ...] at the indices idx [B, r] of each row → [B, r, ...]."""
  return jax.vmap(lambda row, i: row[i])(x, idx)


def scatter_tokens(full: jax.Array, kept: jax.Array, idx: jax.Array) -> jax.Array:
  """``full`` [B, S, ...] with rows' tokens idx [B, r] replaced by kept [B, r, ...].

  Tokens not in ``idx`` pass through unchanged; ``idx`` must be sorted and
  unique per row (as from ``sample_kept_indices``).
  """
  def put(row, values, i):
    return row.at[i].set(values, indices_are_sorted=True, unique_indices=True)
  return jax.vmap(put)(full, kept, idx)


def run_on_kept_tokens(layer: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                       positions: jax.Array, idx: jax.Array) -> jax.Array:
  """Runs ``layer(x_kept [B, r, d], positions_kept [B, r])`` and scatters it into x.

  The kept tokens keep their original positions, so RoPE and ALiBi see true
  distances (DeepSpeed leaves position ids to the model, reference §5(e)).
  """
  out = layer(gather_tokens(x, idx), gather_tokens(positions, idx))
  return scatter_tokens(x, out, idx)
