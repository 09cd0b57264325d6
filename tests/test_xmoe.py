"""X-MoE and DeepSeek-MoE on top of DeepSpeed-MoE: auxiliary-loss-free bias balancing."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import train_metrics

import jaxspeed
from jaxspeed.checkpoint.run_files import restore_latest
from jaxspeed.config import default_config, validate
from jaxspeed.errors import ConfigError
from jaxspeed.moe import top1_gating, top2_gating, topk_gating
from jaxspeed.moe.balancing import bias_update, move_biases
from jaxspeed.training import read_metrics


def _logits(gates):
  return jnp.log(jnp.asarray(gates, jnp.float32))


def test_bias_changes_the_choice_not_the_weights():
  gates = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]
  # Top-1, bias (-0.3, 0, 0): token 0 scores (0.2, 0.3, 0.2) and goes to expert 1 with its
  # unbiased probability 0.3 (top-1 does not renormalize); token 1 stays on expert 1.
  routing = top1_gating(_logits(gates), None, bias=jnp.asarray([-0.3, 0.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(routing.experts), [[1], [1]])
  np.testing.assert_allclose(np.asarray(routing.weights), [[0.3], [0.6]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(routing.counts), [0, 2, 0])
  # The aux loss reads the unbiased probabilities: me = (.3, .45, .25), ce = (0, 1, 0).
  np.testing.assert_allclose(float(routing.aux_loss), 3 * 0.45, rtol=1e-5)
  # Top-2, bias (0, -0.2, 0.05): scores (.5, .1, .25): experts 0 then 2, renormalized .5/.7, .2/.7.
  routing = top2_gating(_logits(gates[:1]), None, bias=jnp.asarray([0.0, -0.2, 0.05]))
  np.testing.assert_array_equal(np.asarray(routing.experts), [[0, 2]])
  np.testing.assert_allclose(np.asarray(routing.weights), [[0.5 / 0.7, 0.2 / 0.7]], rtol=1e-6)
  # Top-3 of 4, bias on expert 3: scores (.4, .3, .2, .35) pick 0, 3, 1 with weights / 0.8.
  routing = topk_gating(_logits([[0.4, 0.3, 0.2, 0.1]]), 3, None,
                        bias=jnp.asarray([0.0, 0.0, 0.0, 0.25]))
  np.testing.assert_array_equal(np.asarray(routing.experts), [[0, 3, 1]])
  np.testing.assert_allclose(np.asarray(routing.weights), [[0.5, 0.125, 0.375]], rtol=1e-6)
  # Without a bias the same gates choose 0, 1, 2.
  np.testing.assert_array_equal(
      np.asarray(topk_gating(_logits([[0.4, 0.3, 0.2, 0.1]]), 3, None).experts), [[0, 1, 2]])


def test_bias_update_moves_against_the_load():
  # Loads (6, 2, 0, 0), mean 2, u = 0.1: the overloaded expert down, the idle ones up.
  np.testing.assert_allclose(np.asarray(bias_update(jnp.asarray([6, 2, 0, 0]), 0.1)),
                             [-0.1, 0.0, 0.1, 0.1], rtol=1e-6)
  old = {"layer_1": {"moe": {"routing_bias": jnp.asarray([0.5, 0.0, 0.0, 0.0]),
                             "gate": jnp.ones((2, 4))}}}
  # The optimizer's result for the bias is replaced; every other leaf is kept.
  new = {"layer_1": {"moe": {"routing_bias": jnp.full((4,), 9.0), "gate": jnp.zeros((2, 4))}}}
  moved = move_biases(old, new, {"layer_1": {"moe": jnp.asarray([6, 2, 0, 0])}}, 0.1)
  np.testing.assert_allclose(np.asarray(moved["layer_1"]["moe"]["routing_bias"]),
                             [0.4, 0.0, 0.1, 0.1], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(moved["layer_1"]["moe"]["gate"]), 0.0)


def _imbalance(balancing):
  """Mean max/mean expert load of the last 6 of 12 steps of a one-device MoE GPT."""
  c = default_config()
  c.update(steps=12, batch_size=16, seq_len=32, sample_tokens=0)
  c.model.update(num_layers=2, num_heads=4, d_model=64, d_ff=256, max_seq_len=32)
  c.optim.warmup = 2
  c.moe.update(num_experts=8, top_k=2, drop_tokens=False, balancing=balancing,
               bias_update_rate=0.01)
  c.parallel.update(data=1, fsdp=1, expert=1, tensor=1)
  history, _, state = train_metrics(c, 12, devices=jax.devices()[:1])
  loads = np.stack([m["moe_expert_tokens"] for m in history[6:]])
  return float(np.mean(loads.max(axis=1) / loads.mean(axis=1))), state


def test_bias_balancing_evens_the_expert_loads():
  unbalanced, state = _imbalance("none")
  balanced, state_bias = _imbalance("bias")
  assert "routing_bias" not in state.params["layer_1"]["moe"]
  assert np.abs(np.asarray(state_bias.params["layer_1"]["moe"]["routing_bias"])).max() > 0
  # Without balancing this tiny model sends about 4x the mean load to its busiest expert.
  assert unbalanced > 3.0
  assert balanced < 0.7 * unbalanced


def test_bias_follows_the_loads_and_is_checkpointed(tiny_config, tmp_path):
  """Every step (8 data-parallel devices) moves the bias by u · sign(mean − load) of that
  step's loads, as logged; the checkpoint holds the result."""
  tiny_config.update(steps=3, log_every=1, checkpoint_every=3, eval_every=3)
  tiny_config.moe.update(num_experts=4, top_k=1, balancing="bias", bias_update_rate=0.01)
  jaxspeed.train(tiny_config, str(tmp_path))
  loads = [r["moe_expert_tokens"] for r in read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
           if "moe_expert_tokens" in r]
  assert len(loads) == 3
  expected = sum(np.asarray(bias_update(jnp.asarray(load), 0.01)) for load in loads)
  setup = jaxspeed.build(tiny_config)
  with jax.set_mesh(setup.mesh):
    state = restore_latest(str(tmp_path), setup.abstract_state())
  np.testing.assert_allclose(np.asarray(state.params["layer_1"]["moe"]["routing_bias"]),
                             expected, atol=1e-6)
  assert np.abs(expected).max() > 0


def test_bias_moves_in_the_master_weights(tiny_config):
  """bfloat16 parameters, ZeRO-3, expert parallelism and 2 microbatches: the float32 master
  holds Σ u · sign(mean − load) exactly; the parameters hold its rounding."""
  tiny_config.model.param_dtype = "bfloat16"
  tiny_config.moe.update(num_experts=4, top_k=1, balancing="bias", bias_update_rate=0.01)
  tiny_config.parallel.update(data=2, fsdp=2, expert=2, tensor=1)
  tiny_config.update(microbatches=2)
  tiny_config.zero.stage = 3
  history, _, state = train_metrics(tiny_config, 3)
  expected = sum(np.asarray(bias_update(jnp.asarray(m["moe_expert_tokens"]), 0.01))
                 for m in history)
  master = state.opt_state.master["layer_1"]["moe"]["routing_bias"]
  np.testing.assert_allclose(np.asarray(master), expected, atol=1e-7)
  params = state.params["layer_1"]["moe"]["routing_bias"]
  assert params.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(params), np.asarray(master.astype(jnp.bfloat16)))


@pytest.mark.parametrize("overrides,key", [
    (dict(balancing="loss_free"), "moe.balancing"),
    (dict(balancing="bias", bias_update_rate=0.0), "moe.bias_update_rate"),
    (dict(balancing="bias", _optim="onebit_adam"), "moe.balancing"),
])
def test_bad_balancing_configs(tiny_config, overrides, key):
  overrides = dict(overrides)
  optim = overrides.pop("_optim", None)
  if optim:
    tiny_config.optim.name = optim
  tiny_config.moe.update(num_experts=4, **overrides)
  with pytest.raises(ConfigError) as error:
    validate(tiny_config, 8)
  assert error.value.key == key
