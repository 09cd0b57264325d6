"""Small shared helpers for tests."""

from __future__ import annotations

import jax

import jaxspeed


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
