"""Small shared helpers for tests."""

from __future__ import annotations

import jax
import numpy as np

import jaxspeed


def assert_trees_close(actual, desired, atol: float = 0.0, rtol: float = 1e-7) -> None:
  """Asserts equal tree structure, then ``np.testing.assert_allclose`` leaf by leaf.

  Unlike zipping two ``jax.tree.leaves`` lists, a missing or extra leaf fails
  here instead of being skipped. ``atol=rtol=0`` asks for exact equality.
  """
  actual_def, desired_def = jax.tree.structure(actual), jax.tree.structure(desired)
  assert actual_def == desired_def, f"tree structures differ:\n{actual_def}\n{desired_def}"
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(desired)]
  for path, a, d in zip(paths, jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(d), atol=atol, rtol=rtol,
                               err_msg=f"leaf {path}")


def train_losses(config, num_steps: int, devices=None):
  """Runs ``num_steps`` train steps in-process.

  Returns:
    (per-step losses, the ``Setup``, the final ``TrainState``).
  """
  setup = jaxspeed.build(config, devices=devices)
  losses = []
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    for _ in range(num_steps):
      state, metrics = setup.train_step(state, setup.to_device(setup.train_data.next_batch()))
      losses.append(float(metrics["loss"]))
  return losses, setup, state
