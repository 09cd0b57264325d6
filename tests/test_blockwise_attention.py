"""Blockwise (online-softmax) attention equals plain attention, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeed.models import ATTENTION_IMPLS, blockwise_attention, causal_mask, dot_product_attention
from jaxspeed.models.blockwise_attention import BLOCK
from jaxspeed.models.positions import alibi_bias

B, S, H, D = 2, 3 * BLOCK, 4, 16


def _qkv():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return tuple(jax.random.normal(k, (B, S, H, D)) for k in keys)


@pytest.mark.parametrize("kind", ["causal", "none", "random_mask", "alibi_causal"])
def test_values_and_gradients_match_plain_attention(kind):
  q, k, v = _qkv()
  positions = jnp.arange(S)
  kwargs = {"causal": dict(mask=causal_mask(S)), "none": {},
            "random_mask": dict(mask=jax.random.bernoulli(jax.random.PRNGKey(1), 0.7,
                                                          (B, 1, S, S))),
            "alibi_causal": dict(mask=causal_mask(S),
                                 bias=alibi_bias(H, positions, positions))}[kind]
  np.testing.assert_allclose(blockwise_attention(q, k, v, **kwargs),
                             dot_product_attention(q, k, v, **kwargs), atol=2e-6)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, **kwargs)))
  got = jax.grad(loss(blockwise_attention), (0, 1, 2))(q, k, v)
  want = jax.grad(loss(dot_product_attention), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=2e-5 * float(jnp.abs(w).max()))


def test_activation_memory_grows_linearly():
  """Temp memory of the gradient at 4x the sequence: about 4x (blockwise) vs about 16x."""
  def temp_bytes(fn, seq):
    q = jax.ShapeDtypeStruct((1, seq, 2, 16), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask=causal_mask(seq))),
                            (0, 1, 2)))
    return grad.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

  blockwise = temp_bytes(blockwise_attention, 4 * 2 * BLOCK) / temp_bytes(blockwise_attention,
                                                                           2 * BLOCK)
  plain = temp_bytes(dot_product_attention, 4 * 2 * BLOCK) / temp_bytes(dot_product_attention,
                                                                         2 * BLOCK)
  assert blockwise < 6 < 10 < plain


def test_selectable_from_the_config():
  assert ATTENTION_IMPLS["blockwise"] is blockwise_attention


def test_gpt_with_blockwise_attention_equals_plain(tiny_config):
  from jaxspeed.models import ModelConfig, build_model

  tiny_config.model.update(max_seq_len=2 * BLOCK, position="rope")
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 2 * BLOCK), 0, 256)
  plain = build_model("gpt", ModelConfig.from_config(tiny_config.model))
  params = plain.init(jax.random.PRNGKey(1), tokens)
  tiny_config.model.attention = "blockwise"
  blockwise = build_model("gpt", ModelConfig.from_config(tiny_config.model))
  np.testing.assert_allclose(jax.jit(blockwise.apply)(params, tokens),
                             jax.jit(plain.apply)(params, tokens), atol=2e-5)
