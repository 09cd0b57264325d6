"""ScaLA's adversarial embedding noise (Zhang, Uma Naresh, He 2022, arXiv 2201.12469).

Large-batch adaptation as a min-max game: the parameters minimize the loss at
the worst perturbation δ of the token embeddings inside an ε-ball,

  min_θ  max_{‖δ_b‖₂ ≤ ε}  L(θ, E(x) + δ),

with δ found by a few steps of projected, normalized gradient ascent (the
PGD of Madry et al. 2018 under an L2 ball, as FreeLB and ScaLA use) and the
parameter gradient taken at the perturbed embeddings only.

δ is added to the output of every ``Embed.__call__`` (the token lookup, before
position and type embeddings) through a flax method interceptor, so GPT, BERT
and any model built on ``Embed`` get it without a model change. The ball is per
example: ‖δ_b‖₂ over a row's [S, d_model] values, so a data-parallel split of
the rows, microbatches or a tensor-parallel split of d_model give the same δ.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.models.layers import Embed
from jaxspeed.optimizers.config import AdversarialConfig

# ``LossSum`` of ``jaxspeed.training.step``: ``(params, batch, rngs, deterministic, step=None,
# **model_kwargs) -> (objective, sums)``; not imported, step imports this module.
_TINY = 1e-12  # keeps a zero gradient's direction zero instead of 0/0


@dataclasses.dataclass(frozen=True)
class EmbeddingNoise:
  """The inner maximization of ScaLA.

  Attributes:
    epsilon: radius ε of each example's L2 ball; > 0 (no ``EmbeddingNoise`` for 0).
    steps: K, ascent steps (each a forward and backward pass) before the outer one.
    step_size: η, the L2 length of each ascent step before projection.
  """

  epsilon: float
  steps: int = 1
  step_size: float = 1e-3

  def __post_init__(self):
    if not self.epsilon > 0:
      raise ValueError(f"epsilon={self.epsilon}; must be > 0")
    if self.steps < 1:
      raise ValueError(f"steps={self.steps}; must be >= 1")
    if not self.step_size > 0:
      raise ValueError(f"step_size={self.step_size}; must be > 0")


def embedding_noise(section) -> EmbeddingNoise | None:
  """The ``EmbeddingNoise`` of config section ``optim.adversarial`` (checked); None when
  its epsilon is 0."""
  cfg = AdversarialConfig.from_config(section)
  if cfg.epsilon == 0:
    return None
  return EmbeddingNoise(cfg.epsilon, cfg.steps, cfg.step_size)


def _row_norm(x: jax.Array) -> jax.Array:
  """[B, ...] -> [B, 1, ..., 1]: each row's L2 norm (float32)."""
  axes = tuple(range(1, x.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True))


def project(delta: jax.Array, epsilon: float) -> jax.Array:
  """Π: each row of ``delta`` [B, S, D] scaled onto the L2 ball of radius ``epsilon`` if
  outside it, untouched inside."""
  norm = _row_norm(delta)
  return jnp.where(norm > epsilon, delta * (epsilon / jnp.maximum(norm, _TINY)), delta)


def ascent_step(delta: jax.Array, grad: jax.Array, noise: EmbeddingNoise) -> jax.Array:
  """δ ← Π_ε(δ + η · g / ‖g‖₂), row by row: one normalized gradient-ascent step."""
  return project(delta + noise.step_size * grad / jnp.maximum(_row_norm(grad), _TINY),
                 noise.epsilon)


@contextlib.contextmanager
def adding_to_embeddings(delta: jax.Array) -> Iterator[None]:
  """Inside, every ``Embed`` lookup [B, S, D] returns its embeddings plus ``delta``."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Embed) and context.method_name == "__call__":
      return out + delta.astype(out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    yield


def _embedding_shape(loss_sum, params, *args, **kwargs) -> jax.ShapeDtypeStruct:
  """The shape of the embeddings ``loss_sum``'s forward looks up (traced, not run)."""
  seen = []

  def interceptor(next_fun, args_, kwargs_, context):
    out = next_fun(*args_, **kwargs_)
    if isinstance(context.module, Embed) and context.method_name == "__call__":
      seen.append(out.shape)
    return out

  def forward():
    with nn.intercept_methods(interceptor):
      return loss_sum(params, *args, **kwargs)

  jax.eval_shape(forward)
  if not seen:
    raise ValueError("adversarial embedding noise needs a model that embeds its tokens with "
                     "jaxspeed.models.layers.Embed")
  return seen[0]


def perturbed(loss_sum, noise: EmbeddingNoise | None):
  """``loss_sum`` evaluated at the adversarial embeddings E(x) + δ_K.

  δ₀ = 0 and δ_{k+1} = ``ascent_step``(δ_k, ∂objective/∂δ at δ_k), with the
  parameters held fixed; the result's parameter gradient is taken at δ_K, which
  is itself held fixed (no gradient flows through the ascent). The inner passes
  use the step's rngs, so they see the same dropout as the outer one.
  Costs K extra forward and backward passes per step. ``noise`` None: ``loss_sum``.
  """
  if noise is None:
    return loss_sum

  def run(params, batch, rngs, deterministic: bool, step=None, **model_kwargs):
    args = (batch, rngs, deterministic, step)

    def at(delta, params):
      with adding_to_embeddings(delta):
        return loss_sum(params, *args, **model_kwargs)

    delta = jnp.zeros(_embedding_shape(loss_sum, params, *args, **model_kwargs), jnp.float32)
    frozen = jax.lax.stop_gradient(params)
    inner_grad = jax.grad(lambda d: at(d, frozen)[0])
    for _ in range(noise.steps):
      delta = ascent_step(delta, inner_grad(delta), noise)
    return at(jax.lax.stop_gradient(delta), params)
  return run
