"""Bamboo's redundancy: successor replicas, and recovery from a lost stage without a checkpoint."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspeed
from jaxspeed.comm.hlo import collectives
from jaxspeed.parallel.bamboo import (
    recover,
    replica_refresh,
    stage_split_leaves,
    successor_replicas,
)


def _config(tiny_config):
  config = tiny_config
  config.model.update(num_layers=4, d_model=32, d_ff=64)
  config.seq_len = config.model.max_seq_len = 16
  config.parallel.update(data=4, stage=2)
  config.pipeline.schedule = "1f1b"
  config.microbatches = 2
  config.zero.stage = 1
  return config


def _steps(setup, state, first: int, last: int):
  losses = []
  with jax.set_mesh(setup.mesh):
    for step in range(first, last):
      state, metrics = setup.train_step(state, setup.to_device(setup.train_data.next_batch()),
                                        step)
      losses.append(float(metrics["loss"]))
  return losses, state


def _lose(state, stage: int):
  """``state`` with every value of ``stage`` on the stage-split leaves replaced by NaN."""
  def poison(leaf):
    spec = getattr(leaf.sharding, "spec", ())
    if not spec or "stage" not in str(spec[0]) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    return jax.jit(lambda x: x.at[stage].set(jnp.nan), out_shardings=leaf.sharding)(leaf)
  return jax.tree.map(poison, state)


def test_lost_stage_recovers_from_replicas_and_continues_the_same_losses(tiny_config):
  setup = jaxspeed.build(_config(tiny_config))
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
  _, state = _steps(setup, state, 0, 2)
  with jax.set_mesh(setup.mesh):
    replicas = successor_replicas(state)
    leaves = stage_split_leaves(state)
    hlo = replica_refresh(leaves).lower(leaves).compile().as_text()
  # Stage s holds stage s + 1's values (the last holds stage 0's): one collective-permute.
  wi = state.params["layers"]["mlp"]["wi"]
  replica = replicas[("params", "layers", "mlp", "wi")]
  np.testing.assert_array_equal(replica[0], wi[1])
  np.testing.assert_array_equal(replica[1], wi[0])
  assert replica.sharding == wi.sharding
  # The optimizer's moments of the stage's layers are replicated with them.
  assert any(path[0] == "opt_state" and "wi" in path for path in replicas)
  assert {c.op for c in collectives(hlo, 8)} == {"collective-permute"}
  data_position = copy.deepcopy(setup.train_data.state)

  # Stage 1's devices are gone: their values must not be read (they are NaN here).
  new_setup, new_state = recover(setup, _lose(state, 1), replicas, lost_stage=1)
  assert new_setup.mesh.shape["stage"] == 1 and new_setup.mesh.size == 4
  assert not {d.id for d in new_setup.mesh.devices.flat} & {
      d.id for d in np.asarray(setup.mesh.devices).take(1, axis=2).flat}
  recovered, _ = _steps(new_setup, new_state, 2, 4)
  setup.train_data.restore(data_position)
  expected, _ = _steps(setup, state, 2, 4)
  np.testing.assert_allclose(recovered, expected, rtol=1e-5)


def test_recover_rejects_a_layout_without_even_stages(tiny_config):
  config = _config(tiny_config)
  config.model.num_layers = 3
  config.parallel.update(data=2, stage=3)
  config.microbatches = 3
  config.batch_size = 12
  setup = jaxspeed.build(config, devices=jax.devices()[:6])
  with jax.set_mesh(setup.mesh):
    state = setup.abstract_state()
  with pytest.raises(ValueError, match="do not split model"):
    recover(setup, state, {}, lost_stage=0)
  with pytest.raises(ValueError, match="lost_stage"):
    recover(setup, state, {}, lost_stage=3)
