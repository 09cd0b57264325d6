"""DeepSpeed-Ulysses sequence parallelism: equal to one device, all-to-all only, clear errors."""

import jax
import numpy as np
import pytest
from helpers import train_losses

import jaxspeed
from jaxspeed.comm import hlo
from jaxspeed.parallel import pad_to_multiple

STEPS = 10


@pytest.fixture
def sp_config(tiny_config):
  c = tiny_config
  c.batch_size = 8
  c.model.num_heads = 8
  c.model.d_model = 32
  c.model.d_ff = 64
  return c


def _losses(config, **parallel):
  for axis, size in parallel.items():
    config.parallel[axis] = size
  devices = jax.devices()[:int(np.prod(list(parallel.values())))]
  return np.array(train_losses(config, STEPS, devices=devices)[0])


@pytest.mark.parametrize("overrides, mesh", [
    ({}, dict(sequence=8)),
    ({"model.position": "alibi", "zero.stage": 3}, dict(sequence=4, data=2)),
    ({"model.position": "rope", "model.num_kv_heads": 2, "zero.stage": 1},
     dict(sequence=2, tensor=2, data=2)),
    ({"model.num_kv_heads": 2}, dict(sequence=8)),  # fewer kv heads than P: replicated (ALST)
])
def test_sequence_parallel_matches_single_device(sp_config, overrides, mesh):
  for key, value in overrides.items():
    section, name = key.split(".")
    sp_config[section][name] = value
  single = _losses(sp_config.copy_and_resolve_references(), data=1)
  parallel = _losses(sp_config, **mesh)
  np.testing.assert_allclose(parallel, single, rtol=1e-4)
  assert single[-1] < single[0]


def test_padding_keeps_the_loss_of_the_unpadded_batch(sp_config):
  sp_config.seq_len = 30
  single = _losses(sp_config.copy_and_resolve_references(), data=1)
  sp_config.sequence_parallel.pad = True
  np.testing.assert_allclose(_losses(sp_config, sequence=4, data=2), single, rtol=1e-4)


def test_pad_to_multiple():
  batch = {"inputs": np.ones((2, 5), np.int32), "targets": np.ones((2, 5), np.int32),
           "positions": np.arange(10).reshape(2, 5)}
  padded = pad_to_multiple(batch, 4)
  assert padded["inputs"].shape == (2, 8)
  np.testing.assert_array_equal(padded["loss_mask"][0], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(padded["positions"][1], [5, 6, 7, 8, 9, 10, 11, 12])
  assert pad_to_multiple(batch, 5) is batch


def test_step_exchanges_heads_with_all_to_all_and_never_gathers_the_sequence(sp_config):
  sp_config.parallel.sequence = 8
  sp_config.parallel.data = 1
  setup = jaxspeed.build(sp_config)
  with jax.set_mesh(setup.mesh):
    state = setup.abstract_state()
    batch = setup.to_device(setup.train_data.next_batch())
    text = setup.train_step.lower(state, batch).compile().as_text()
  ops = hlo.collectives(text, 8)
  # q, k, v and the output, per layer, in the forward and again in the backward.
  assert sum(c.op == "all-to-all" for c in ops) == 2 * 4 * sp_config.model.num_layers
  # Every activation crossing devices is a 1/P slice: no all-gather moves a
  # [B, S, d] activation (B·S·d·4 bytes) or anything of full sequence length.
  c = sp_config
  full_activation = c.batch_size * c.seq_len * c.model.d_model * 4
  gathers = [op for op in ops if op.op == "all-gather"]
  assert all(op.result_bytes < full_activation for op in gathers), gathers


@pytest.mark.parametrize("overrides, key", [
    (dict(num_heads=4), "model.num_heads"),  # 4 heads over sequence=8
    (dict(seq_len=36), "seq_len"),
    (dict(name="onebit_adam"), "optim.name"),
])
def test_bad_sequence_parallel_configs(sp_config, overrides, key):
  sp_config.parallel.sequence = 8
  sp_config.parallel.data = 1
  sp_config.model.max_seq_len = 64
  for k, v in overrides.items():
    if k == "seq_len":
      sp_config.seq_len = v
    elif k == "name":
      sp_config.optim.name = v
    else:
      sp_config.model[k] = v
  with pytest.raises(jaxspeed.ConfigError, match=key.replace(".", r"\.")):
    jaxspeed.validate(sp_config, 8)


def test_kv_heads_must_cover_the_sequence_degree(sp_config):
  sp_config.parallel.sequence = 4
  sp_config.parallel.data = 2
  sp_config.model.num_heads = 12
  sp_config.model.d_model = 48
  sp_config.model.num_kv_heads = 6  # neither a multiple nor a divisor of 4
  with pytest.raises(jaxspeed.ConfigError, match=r"model\.num_kv_heads"):
    jaxspeed.validate(sp_config, 8)


def test_padding_needs_a_causal_model(sp_config):
  sp_config.model.name = "bert"
  sp_config.sequence_parallel.pad = True
  with pytest.raises(jaxspeed.ConfigError, match=r"sequence_parallel\.pad"):
    jaxspeed.validate(sp_config, 8)
