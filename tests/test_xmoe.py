"""X-MoE and DeepSeek-MoE on top of DeepSpeed-MoE: auxiliary-loss-free bias balancing,
padding-free and deduplicated dropless dispatch."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiled_step_text, random_expert_weights, train_metrics

import jaxspeed
from jaxspeed.checkpoint.run_files import restore_latest
from jaxspeed.comm.hlo import collectives
from jaxspeed.config import default_config, validate
from jaxspeed.errors import ConfigError
from jaxspeed.moe import (
    dropless_experts,
    expert_parallel_dropless,
    top1_gating,
    top2_gating,
    topk_gating,
)
from jaxspeed.moe.balancing import bias_update, move_biases
from jaxspeed.moe.dropless import buffer_rows
from jaxspeed.parallel.mesh import make_mesh
from jaxspeed.parallel.rules import compute_rules
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
    (dict(dispatch="padding_free"), "moe.dispatch"),  # drop_tokens is on
    (dict(dedup_dispatch=True), "moe.dedup_dispatch"),
    (dict(drop_tokens=False, dispatch="padding_free", dispatch_slack=0.5), "moe.dispatch_slack"),
    (dict(drop_tokens=False, dispatch="ragged"), "moe.dispatch"),
    (dict(drop_tokens=False, top_k=5), "moe.top_k"),
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


def _per_token(w, x, experts, weights):
  p = {k: np.asarray(v) for k, v in w._asdict().items()}
  out = np.zeros(x.shape, np.float32)
  for index in np.ndindex(*x.shape[:-1]):
    for e, g in zip(experts[index], np.asarray(weights[index])):
      h = np.asarray(jax.nn.gelu(np.asarray(x[index]) @ p["wi"][e] + p["wi_bias"][e]))
      out[index] += g * (h @ p["wo"][e] + p["wo_bias"][e])
  return out


# Token s of every device's 4 picks 3 of 8 experts (ep 4: experts 2i, 2i+1 on shard i).
# BALANCED: 3 rows (and 3 token-shard pairs) to every shard, the balanced share, so slack 1
# fits. SKEWED: every token picks experts 0 and 1, both on shard 0: 8 assignments and 4 pairs
# to shard 0, over the tight buffers of 3, so the exact ones run.
BALANCED = [[0, 3, 5], [2, 5, 7], [4, 7, 1], [6, 1, 3]]
SKEWED = [[0, 1, 5], [1, 0, 7], [0, 1, 2], [6, 1, 0]]


@pytest.mark.parametrize("routing", ["balanced", "skewed"])
@pytest.mark.parametrize("dedup,slack", [(False, None), (False, 1.0), (True, None), (True, 1.0)])
def test_dropless_dispatches_equal_the_per_token_loop(routing, dedup, slack):
  num_experts, d, f = 8, 16, 32
  w = random_expert_weights(jax.random.PRNGKey(0), num_experts, d, f)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 4, d))
  pattern = BALANCED if routing == "balanced" else SKEWED
  experts = np.tile(np.asarray(pattern, np.int32), (8, 1, 1))
  weights = jax.random.uniform(jax.random.PRNGKey(2), (8, 4, 3))
  with jax.set_mesh(make_mesh(dict(expert=4, data=2))), nn.logical_axis_rules(compute_rules()):
    y, fell_back = jax.jit(lambda *a: expert_parallel_dropless(*a, dedup=dedup, slack=slack))(
        x, jnp.asarray(experts), weights, w)
  # Only the skewed routing overflows the tight buffers (exact ones have nothing to overflow).
  assert bool(fell_back) == (routing == "skewed" and slack is not None)
  expected = _per_token(w, x, experts, weights)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
  # One device: the same function without an exchange.
  single, _ = dropless_experts(x.reshape(32, d), jnp.asarray(experts).reshape(32, 3),
                               weights.reshape(32, 3), w, dedup=dedup, slack=slack)
  np.testing.assert_allclose(np.asarray(single).reshape(8, 4, d), expected, rtol=1e-5,
                             atol=1e-5)


def test_buffer_rows():
  # 4 tokens, top-3 of 8 experts on 4 shards (2 each): exact 4 · min(3, 2) = 8 assignments
  # or 4 pairs per destination; balanced 4 · 3 / 4 = 3 either way.
  assert buffer_rows(4, 3, 2, 4, dedup=False, slack=None) == 8
  assert buffer_rows(4, 3, 2, 4, dedup=False, slack=1.0) == 3
  assert buffer_rows(4, 3, 2, 4, dedup=False, slack=1.5) == 5  # ⌈4.5⌉
  assert buffer_rows(4, 3, 2, 4, dedup=True, slack=None) == 4
  assert buffer_rows(4, 3, 2, 4, dedup=True, slack=2.0) == 4  # never above exact
  # Top-8 of 64 experts on 8 shards: exact 8 · T assignments, padding-free 2 · T at slack 2.
  assert buffer_rows(64, 8, 8, 8, dedup=False, slack=2.0) * 4 == buffer_rows(
      64, 8, 8, 8, dedup=False, slack=None)


def _dropless_config(config, **moe):
  config.update(steps=4)
  config.moe.update(num_experts=8, top_k=2, drop_tokens=False, **moe)
  config.parallel.update(data=1, fsdp=1, tensor=1, expert=1)
  return config


@pytest.fixture(scope="module")
def one_device_dropless_losses():
  """4 steps of a top-2 dropless MoE GPT (``tiny_config``'s shapes) on one device."""
  config = default_config()
  config.update(batch_size=16, seq_len=32, sample_tokens=0)
  config.model.update(num_layers=2, num_heads=4, d_model=64, d_ff=256, max_seq_len=32)
  config.optim.warmup = 2
  return train_metrics(_dropless_config(config), 4, devices=jax.devices()[:1])[0]


# (moe settings, fallbacks to the exact buffers in each of the 4 steps, None: not checked).
# At slack 3 the first step fits (48 rows per destination, 16 balanced); as the router
# grows unbalanced (no balancing here), later steps overflow and fall back.
DISPATCH_RUNS = [
    (dict(dispatch="padding_free", dispatch_slack=3.0), [0, None, None, None]),
    (dict(dispatch="padding_free", dispatch_slack=1.0), [1, 1, 1, 1]),
    (dict(dedup_dispatch=True), [0, 0, 0, 0]),  # the exact pair buffer: no fallback
    (dict(dispatch="padding_free", dedup_dispatch=True), [0, None, None, None]),
]


@pytest.mark.parametrize("moe,fallbacks", DISPATCH_RUNS)
def test_expert_parallel_dispatches_train_like_one_device(tiny_config, one_device_dropless_losses,
                                                           moe, fallbacks):
  """ep 8, one expert per device, top-2: the same losses and loads as one device, nothing
  dropped, whichever buffer each step ran."""
  config = _dropless_config(tiny_config, **moe)
  config.parallel.expert = 8
  history = train_metrics(config, 4)[0]
  for got, want, fell_back in zip(history, one_device_dropless_losses, fallbacks, strict=True):
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
    np.testing.assert_array_equal(got["moe_expert_tokens"], want["moe_expert_tokens"])
    assert float(got["moe_dropped_fraction"]) == 0.0
    if fell_back is not None:
      assert int(got["moe_dispatch_fallbacks"]) == fell_back


def _all_to_all_bytes(config) -> float:
  text = compiled_step_text(jaxspeed.build(config))
  return sum(c.sent_bytes for c in collectives(text, jax.device_count()) if c.op == "all-to-all")


def test_dedup_dispatch_sends_each_token_once_per_shard(tiny_config):
  """Top-4 of 16 experts on 4 shards (4 each): the exact plain buffer holds T · 4 rows per
  destination, the deduplicated one T rows plus each row's 4 expert ids and gates.

  Per device and MoE layer, with (ep − 1)/ep of each all-to-all sent: plain moves the rows
  four times (dispatch and combine, forward and backward) and its int32 ids once; dedup
  moves its rows four times, its ids once and its gates twice (forward, and their
  gradient back)."""
  tiny_config.moe.update(num_experts=16, top_k=4, drop_tokens=False)
  tiny_config.parallel.update(data=2, fsdp=1, tensor=1, expert=4)
  plain = _all_to_all_bytes(tiny_config)
  tiny_config.moe.dedup_dispatch = True
  dedup = _all_to_all_bytes(tiny_config)
  ep, tokens, d = 4, 16 * 32 // 8, tiny_config.model.d_model
  share = (ep - 1) / ep * ep * 4  # of the [ep, rows, ...] buffers, 4-byte elements
  assert plain == share * tokens * 4 * (4 * d + 1)
  assert dedup == share * tokens * (4 * d + 3 * 4)
  assert dedup < 0.3 * plain


@pytest.mark.parametrize("parallel", [dict(sequence=2, expert=2, data=2)], ids=["sp2_ep2_dp2"])
def test_sequence_sharded_moe_trains_like_one_device(tiny_config, one_device_dropless_losses,
                                                     parallel):
  """With Ulysses on, each device dispatches its own shard of the sequence: the same losses and
  loads as one device, and no all-gather brings a layer's [B, S, d] activations together."""
  config = _dropless_config(tiny_config)
  config.parallel.update(parallel)
  history, setup, _ = train_metrics(config, 4)
  for got, want in zip(history, one_device_dropless_losses, strict=True):
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
    np.testing.assert_array_equal(got["moe_expert_tokens"], want["moe_expert_tokens"])
  rows = config.batch_size // parallel["data"] // parallel.get("expert", 1)
  full_sequence = rows * config.seq_len * config.model.d_model * 4
  gathered = [c for c in collectives(compiled_step_text(setup), jax.device_count())
              if c.op == "all-gather" and c.result_bytes >= full_sequence]
  assert not gathered
