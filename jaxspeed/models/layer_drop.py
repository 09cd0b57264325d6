"""Progressive Layer Dropping (Zhang & He 2020, arXiv 2010.13369, §4 and Algorithm 1).

Each step, layer i of L is kept with probability p_i = 1 − i(1 − θ(t))/L and
otherwise skipped (identity); a kept layer divides its residual branches by
p_i so that their expected contribution is unchanged. θ(t) decays from 1 (no
dropping) to θ̄.

The paper applies this to a pre-LN BERT (its "switchable transformer", needed
for stability); here it scales the residual branches of whichever ``Block``
the model uses, pre-LN (GPT) or post-LN (our BERT). Two deliberate
differences from DeepSpeed (reference ``deepspeed-algorithms.md`` §6):

* DeepSpeed keeps layer i (1-based) with 1 − (i−1)(1−θ)/L, so its first
  layer is always kept, but rescales by 1 − i(1−θ)/L: an off-by-one between
  the draw and the rescale. We use the paper's p_i for both.
* DeepSpeed draws with numpy on each rank, so data-parallel workers drop
  different layers. We draw from a replicated JAX key: one decision per layer
  per step, identical on every worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def pld_theta(step, theta_bar: float, gamma: float):
  """θ(t) = (1 − θ̄)·exp(−γ t) + θ̄: 1 at t = 0, decaying to θ̄.

  A python number for a python ``step``, else a float32 array (traceable).
  """
  if isinstance(step, (int, float)):
    return (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar
  step = jnp.asarray(step, jnp.float32)
  return (1.0 - theta_bar) * jnp.exp(-gamma * step) + theta_bar


def keep_probability(layer_index, num_layers: int, theta):
  """p_i = 1 − i(1 − θ)/L for 1-based ``layer_index`` i (python or array)."""
  return 1.0 - layer_index * (1.0 - theta) / num_layers


def draw_layer_keeps(rng: jax.Array, num_layers: int,
                     theta: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One Bernoulli(p_i) keep decision per layer.

  Args:
    rng: a key; replicated over data-parallel workers, so all agree.
    num_layers: L.
    theta: float32 scalar θ(t).

  Returns:
    (keep bool [L], p float32 [L]) for layers i = 1..L.
  """
  probs = keep_probability(jnp.arange(1, num_layers + 1, dtype=jnp.float32), num_layers,
                           jnp.asarray(theta, jnp.float32))
  return jax.random.uniform(rng, (num_layers,)) < probs, probs


def run_or_skip(layer: nn.Module, run: Callable[[nn.Module, jax.Array, jax.Array], jax.Array],
                x: jax.Array, keep: jax.Array, keep_prob: jax.Array) -> jax.Array:
  """``run(layer, x, 1/keep_prob)`` if ``keep`` else ``x``.

  A lifted ``lax.cond``, so a skipped layer runs no matmul (unlike DeepSpeed
  under ZeRO-3, reference §6(d)); under ``vmap`` it would become a select
  that computes both branches. ``layer`` must already have its parameters
  (call ``run`` directly at init), since only one branch creates them.

  What a skipped layer still costs is set by the model's ``remat``.
  Differentiated, a ``cond`` returns the residuals of both branches for the
  backward pass, the skipping branch's as zeros: without remat these are
  the layer's activations, written as zeros when it is skipped and kept out
  of the surrounding fusions when it runs. Under ``remat="full"`` the only
  residual is the layer's input, so a skipped layer costs nearly nothing
  and a kept one its usual recomputation. Which is faster depends on whether
  the step is bound by memory traffic or by FLOPs (``experiments/pld.py``
  measures both).

  With keep_prob = 1 the kept branch does the plain layer's arithmetic; inside
  a larger jitted program XLA fuses across the cond boundary differently, so
  results can differ from the plain model's by a few ulp.
  """
  return nn.cond(keep, lambda mdl, h: run(mdl, h, 1.0 / keep_prob), lambda _, h: h, layer, x)
