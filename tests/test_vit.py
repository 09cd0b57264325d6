"""The small ViT encoder: patch order, shapes, and its error for a wrong image size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeed.models import ModelConfig
from jaxspeed.models.vit import VisionTransformer, num_patches, patchify


def test_patchify_is_row_major_by_hand():
  images = np.arange(2 * 4 * 4 * 2).reshape(2, 4, 4, 2)
  patches = np.asarray(patchify(jnp.asarray(images), 2))
  assert patches.shape == (2, 4, 8)
  # Patch 1 is rows 0-1, columns 2-3; within it pixel by pixel, channels innermost.
  expected = [images[1, r, c, ch] for r in (0, 1) for c in (2, 3) for ch in (0, 1)]
  np.testing.assert_array_equal(patches[1, 1], expected)
  np.testing.assert_array_equal(patches[0, 2], images[0, 2:4, 0:2].reshape(-1))


def test_features_classify_and_wrong_image_size():
  cfg = ModelConfig(num_layers=1, num_heads=2, d_model=16, d_ff=32)
  vit = VisionTransformer(cfg, image_size=8, patch_size=4, num_classes=10)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
  params = vit.init(jax.random.key(0), images)["params"]
  features = vit.apply({"params": params}, images)
  assert features.shape == (3, 1 + num_patches(8, 4), 16)
  # The encoder is bidirectional: the first patch's feature depends on the last patch.
  changed = images.at[:, 4:, 4:].add(1.0)
  assert not np.allclose(vit.apply({"params": params}, changed)[:, 1], features[:, 1])
  assert vit.apply({"params": params}, images, method=VisionTransformer.classify).shape == (3, 10)
  with pytest.raises(ValueError, match=r"encoder takes \(8, 8, 1\)"):
    vit.apply({"params": params}, jnp.zeros((1, 16, 16, 1)))
