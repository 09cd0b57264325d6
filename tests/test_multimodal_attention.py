"""MMCA (multi-modal causal attention) against a hand-computed case and plain attention."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxspeed.models import blockwise_attention
from jaxspeed.models.attention import causal_mask, dot_product_attention
from jaxspeed.models.multimodal_attention import (
    PAD,
    TEXT,
    causal_mixed_mask,
    mmca_attention,
    mmca_masks,
)


def _softmax_average(scores: np.ndarray, values: np.ndarray, keys: list[int]) -> np.ndarray:
  """softmax over ``keys`` of one query's scores, times their values."""
  if not keys:
    return np.zeros(values.shape[-1])
  w = np.exp(scores[keys] - scores[keys].max())
  return (w / w.sum()) @ values[keys]


def test_mmca_against_hand_computed_rows():
  # [t0, image 1 (two tokens), t3, pad]: one head, D = 2.
  segments = jnp.array([[TEXT, 1, 1, TEXT, PAD]])
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(1, 5, 1, 2)).astype(np.float32) for _ in range(3))
  out = np.asarray(mmca_attention(dot_product_attention, q, k, v, segments))[0, :, 0]
  scores = (q[0, :, 0] @ k[0, :, 0].T) / np.sqrt(2)
  values = v[0, :, 0]
  # (text-branch keys, image-branch keys) of each query, written out by hand.
  branches = {0: ([0], []),  # text before any image: itself only, no image branch
              1: ([], [1, 2]), 2: ([], [1, 2]),  # image tokens: their own image, both ways
              3: ([0, 3], [1, 2]),  # text after the image: earlier text + the image, apart
              4: ([], [])}  # padding attends to nothing
  for row, (text_keys, image_keys) in branches.items():
    expected = (_softmax_average(scores[row], values, text_keys)
                + _softmax_average(scores[row], values, image_keys))
    np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-6, err_msg=f"row {row}")
  text_branch, image_branch = (np.asarray(m)[0, 0] for m in mmca_masks(segments))
  assert not (text_branch & image_branch).any()  # the two softmaxes never share a key
  assert not image_branch[:, 4].any() and not text_branch[:, 4].any()  # padding is no key


def test_mmca_without_images_is_causal_attention():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 12, 2, 4)), jnp.float32) for _ in range(3))
  segments = jnp.zeros((2, 12), jnp.int32)
  expected = dot_product_attention(q, k, v, mask=causal_mask(12))
  np.testing.assert_allclose(mmca_attention(dot_product_attention, q, k, v, segments),
                             expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(causal_mixed_mask(segments)[0], causal_mask(12)[0])


def test_mmca_blockwise_equals_xla_with_gradients():
  """Two images and text interleaved over two key blocks: the online-softmax kernel gives
  the dense path's output and gradients."""
  seq = 2 * 128
  segments = np.zeros((1, seq), np.int32)
  segments[0, 10:40], segments[0, 150:200], segments[0, -6:] = 1, 2, PAD
  segments = jnp.asarray(segments)
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(1, seq, 2, 8)), jnp.float32) for _ in range(3))

  def loss(attend, q, k, v):
    return jnp.sum(jnp.sin(mmca_attention(attend, q, k, v, segments)))

  dense = jax.value_and_grad(lambda *a: loss(dot_product_attention, *a), (0, 1, 2))(q, k, v)
  blocks = jax.value_and_grad(lambda *a: loss(blockwise_attention, *a), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(blocks[0], dense[0], rtol=1e-5)
  for got, want in zip(blocks[1], dense[1], strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
