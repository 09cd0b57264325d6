"""DeepSpeed-MoE: gates on hand-made logits, dropless, capacity > S, expert parallelism (with and
without drops), config."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_expert_weights, train_losses

from jaxspeed.config import default_config, validate
from jaxspeed.errors import ConfigError
from jaxspeed.models import GPT, ModelConfig
from jaxspeed.moe import (
    Distillation,
    MoeConfig,
    MoeMlp,
    capacity,
    dispatch_and_combine,
    dropless_experts,
    expert_parallel_dropless,
    kd_loss_sum,
    param_counts,
    top1_gating,
    top2_gating,
    topk_gating,
)
from jaxspeed.parallel.mesh import make_mesh
from jaxspeed.parallel.rules import compute_rules
from jaxspeed.training.step import loss_sum_fn


def _logits(gates):
  return jnp.log(jnp.asarray(gates, jnp.float32))


def _dense(entries, shape):
  """[S, E, C] tensor with weight w at each (s, e, c, w) of ``entries``."""
  out = np.zeros(shape, np.float32)
  for s, e, c, w in entries:
    out[s, e, c] = w
  return out


def _check(routing, num_experts, cap, entries, aux, counts, dropped):
  dispatch, combine = dispatch_and_combine(routing, num_experts, cap)
  expected = _dense(entries, dispatch.shape)
  np.testing.assert_array_equal(np.asarray(dispatch), expected > 0)
  np.testing.assert_allclose(np.asarray(combine), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(routing.aux_loss), aux, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(routing.counts), counts)
  assert int(routing.dropped) == dropped


TOP1_GATES = [[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]]
# me = [0.6, 0.4], ce = [3/4, 1/4]: aux = E · Σ me·ce = 2 · (0.45 + 0.1).
TOP1_AUX = 1.1


def test_capacity_formula():
  assert capacity(4, 2, 1.0, 0) == 2  # ⌈4/2 · 1⌉
  assert capacity(4, 3, 0.5, 0, k=2) == 2  # ⌈4/3 · 0.5 · 2⌉
  assert capacity(4, 2, 1.0, 4) == 4  # min_capacity
  assert capacity(10, 4, 1.25, 1, k=1) == 4  # ⌈3.125⌉


def test_top1_first_come_drops_and_raw_gate_weight():
  routing = top1_gating(_logits(TOP1_GATES), capacity=2)
  # Expert 0 gets tokens 0, 1, 3: slots 0, 1, and token 3 is over capacity.
  # Weights are the raw softmax probabilities (top-1 does not renormalize).
  _check(routing, 2, 2, [(0, 0, 0, 0.7), (1, 0, 1, 0.6), (2, 1, 0, 0.8)],
         TOP1_AUX, [3, 1], dropped=1)


def test_top1_random_token_selection():
  noise = jnp.asarray([[0.1, 0.5], [0.5, 0.5], [0.5, 0.5], [0.9, 0.5]], jnp.float32)
  routing = top1_gating(_logits(TOP1_GATES), capacity=2, rts_noise=noise)
  # Expert 0 keeps its two highest-priority tokens (3 and 1) and drops token 0;
  # slots follow token order among the kept.
  _check(routing, 2, 2, [(1, 0, 0, 0.6), (3, 0, 1, 0.9), (2, 1, 0, 0.8)],
         TOP1_AUX, [3, 1], dropped=1)


def test_top1_selection_noise_only_changes_the_choice():
  gumbel = jnp.asarray([[0, 5.0], [0, 0], [0, 0], [0, 0]], jnp.float32)
  routing = top1_gating(_logits(TOP1_GATES), capacity=4, selection_noise=gumbel)
  # Token 0 goes to expert 1 but keeps its noise-free probability 0.3 as weight.
  _check(routing, 2, 4, [(0, 1, 0, 0.3), (1, 0, 0, 0.6), (2, 1, 1, 0.8), (3, 0, 1, 0.9)],
         2 * (0.6 * 0.5 + 0.4 * 0.5), [2, 2], dropped=0)


def test_top2_second_choices_queue_behind_first_and_renormalize():
  gates = [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.1, 0.3, 0.6], [0.7, 0.2, 0.1]]
  cap = capacity(4, 3, 0.5, 0, k=2)
  routing = top2_gating(_logits(gates), cap)
  # 1st choices e0: t0 t1 (t3 over C=2); e2: t2. 2nd choices start after all
  # 1st choices of their expert: e1 (no 1st) t0 → 0, t2 → 1, t3 over; e2 t1 → 1.
  entries = [(0, 0, 0, 0.5 / 0.8), (0, 1, 0, 0.3 / 0.8), (1, 0, 1, 0.6 / 0.9),
             (1, 2, 1, 0.3 / 0.9), (2, 2, 0, 0.6 / 0.9), (2, 1, 1, 0.3 / 0.9)]
  # me = [.475, .225, .3], ce (first choice only) = [.75, 0, .25]: mean(me·ce)·E².
  _check(routing, 3, cap, entries, (0.475 * 0.75 + 0.3 * 0.25) / 3 * 9, [3, 3, 2], dropped=2)


TOPK_GATES = [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.4, 0.25, 0.28, 0.07]]
# me = [.3, .25, .26, .19], ce (all 3 choices) = [2/3, 1, 1, 1/3]: mean(me·ce)·E²/k.
TOPK_AUX = (0.3 * 2 / 3 + 0.25 + 0.26 + 0.19 / 3) / 4 * 16 / 3


def test_topk_drops_lowest_probabilities():
  cap = capacity(3, 4, 0.5, 0, k=3)
  assert cap == 2
  routing = topk_gating(_logits(TOPK_GATES), 3, cap, drop_policy="probs")
  # e1 keeps t0 (.3), t2 (.25), drops t1 (.2); e2 keeps t1 (.3), t2 (.28), drops t0 (.2).
  entries = [(0, 0, 0, 0.4 / 0.7), (0, 1, 0, 0.3 / 0.7), (1, 3, 0, 0.4 / 0.7),
             (1, 2, 0, 0.3 / 0.7), (2, 0, 1, 0.4 / 0.93), (2, 2, 1, 0.28 / 0.93),
             (2, 1, 1, 0.25 / 0.93)]
  _check(routing, 4, cap, entries, TOPK_AUX, [2, 3, 3, 1], dropped=2)


def test_topk_drops_by_position():
  routing = topk_gating(_logits(TOPK_GATES), 3, 2, drop_policy="position")
  # e1 and e2 keep t0, t1 and drop t2.
  entries = [(0, 0, 0, 0.4 / 0.9), (0, 1, 0, 0.3 / 0.9), (0, 2, 0, 0.2 / 0.9),
             (1, 3, 0, 0.4 / 0.9), (1, 2, 1, 0.3 / 0.9), (1, 1, 1, 0.2 / 0.9),
             (2, 0, 1, 1.0)]
  _check(routing, 4, 2, entries, TOPK_AUX, [2, 3, 3, 1], dropped=2)


def test_capacity_above_token_count():
  """DeepSpeed PR #8155: a top-C over S < C tokens crashed; here slots simply stay empty."""
  noise = jax.random.uniform(jax.random.PRNGKey(0), (4, 2))
  routing = top1_gating(_logits(TOP1_GATES), capacity=16, rts_noise=noise)
  _check(routing, 2, 16, [(0, 0, 0, 0.7), (1, 0, 1, 0.6), (2, 1, 0, 0.8), (3, 0, 2, 0.9)],
         TOP1_AUX, [3, 1], dropped=0)
  cfg = ModelConfig(d_model=16, d_ff=32, num_heads=2)
  layer = MoeMlp(cfg, MoeConfig(num_experts=2, capacity_factor=8.0, min_capacity=0), 2)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16))
  params = jax.jit(layer.init, static_argnums=2)(jax.random.PRNGKey(2), x, True)
  assert layer.capacity(3, training=True) == 12
  y, sown = jax.jit(lambda p, x, key: layer.apply(p, x, True, rngs={"moe": key}, mutable=["moe"]))(
      params, x, jax.random.PRNGKey(3))
  assert np.isfinite(np.asarray(y)).all()
  assert int(sown["moe"]["dropped"][0]) == 0


def _expert(p, e, x):
  h = np.asarray(jax.nn.gelu(x @ p["wi"][e] + p["wi_bias"][e]))
  return h @ p["wo"][e] + p["wo_bias"][e]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_equals_per_token_loop(top_k):
  cfg = ModelConfig(d_model=16, d_ff=32, num_heads=2)
  moe = MoeConfig(num_experts=4, top_k=top_k, drop_tokens=False)
  layer = MoeMlp(cfg, moe, 4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 16))
  params = nn.meta.unbox(jax.jit(layer.init, static_argnums=2)(jax.random.PRNGKey(1), x, True))
  y, sown = jax.jit(lambda p, x: layer.apply(p, x, True, mutable=["moe"]))(params, x)
  assert int(sown["moe"]["dropped"][0]) == 0
  p = jax.tree.map(np.asarray, params["params"])
  expected = np.zeros((16, 16), np.float32)
  for t, token in enumerate(np.asarray(x).reshape(16, 16)):
    logits = token @ p["gate"]
    gates = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    chosen = np.argsort(-gates, kind="stable")[:top_k]
    # Top-1 keeps the raw probability; top-2 and top-k renormalize over the choices.
    weights = gates[chosen] if top_k == 1 else gates[chosen] / gates[chosen].sum()
    for e, w in zip(chosen, weights):
      expected[t] += w * np.asarray(_expert(p, e, token))
  np.testing.assert_allclose(np.asarray(y).reshape(16, 16), expected, rtol=1e-4, atol=1e-5)


def test_fine_grained_top4_with_shared_experts_is_the_per_token_sum():
  """DeepSeek-MoE's layout: 8 experts of d_ff / 4, top-4, and 2 shared experts that every
  token passes through ungated: the routed mixture plus one dense MLP of twice the
  expert width, token by token."""
  cfg = ModelConfig(d_model=16, d_ff=32, num_heads=2)
  moe = MoeConfig(num_experts=8, top_k=4, drop_tokens=False, expert_d_ff=8,
                  num_shared_experts=2)
  layer = MoeMlp(cfg, moe, 8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16))
  params = nn.meta.unbox(jax.jit(layer.init, static_argnums=2)(jax.random.PRNGKey(1), x, True))
  p = jax.tree.map(np.asarray, params["params"])
  assert p["wi"].shape == (8, 16, 8) and p["shared_experts"]["wi"].shape == (16, 16)
  y = jax.jit(lambda p, x: layer.apply(p, x, True, mutable=["moe"])[0])(params, x)
  expected = np.zeros((8, 16), np.float32)
  for t, token in enumerate(np.asarray(x).reshape(8, 16)):
    logits = token @ p["gate"]
    gates = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    chosen = np.argsort(-gates, kind="stable")[:4]
    for e, w in zip(chosen, gates[chosen] / gates[chosen].sum()):
      expected[t] += w * np.asarray(_expert(p, e, token))
    shared = p["shared_experts"]
    h = np.asarray(jax.nn.gelu(token @ shared["wi"] + shared["wi_bias"]))
    expected[t] += h @ shared["wo"] + shared["wo_bias"]
  np.testing.assert_allclose(np.asarray(y).reshape(8, 16), expected, rtol=1e-4, atol=1e-5)


def test_train_objective_adds_scaled_aux_loss():
  cfg = ModelConfig(num_layers=2, d_model=32, d_ff=64, num_heads=2, max_seq_len=8,
                    moe=MoeConfig(num_experts=4, expert_interval=1))
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 256)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  batch = {"inputs": tokens, "targets": tokens}
  objective, sums = jax.jit(lambda p, b, key: loss_sum_fn(model, aux_loss_coef=0.5)(
      p, b, {"moe": key}, True))(params, batch, jax.random.PRNGKey(2))
  assert sums["moe_expert_tokens"].shape == (8,)  # two MoE layers of 4 experts
  assert int(sums["moe_expert_tokens"].sum()) == 2 * 16
  aux_sum = float(sums["moe_aux_sum"])  # Σ_layers aux · tokens; aux >= 1 (balanced = 1)
  assert aux_sum >= 2 * 16 * 0.99
  np.testing.assert_allclose(float(objective), float(sums["loss_sum"]) + 0.5 * aux_sum,
                             rtol=1e-6)


def test_fine_grained_experts_train_from_the_config(tiny_config):
  """16 experts of d_ff / 4, top-4, one shared expert, tensor and data parallel: trains."""
  tiny_config.moe.update(num_experts=16, top_k=4, expert_d_ff=64, num_shared_experts=1,
                         drop_tokens=False)
  tiny_config.parallel.update(data=4, fsdp=1, tensor=2)
  losses, _, state = train_losses(tiny_config, 4)
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  moe = state.params["layer_1"]["moe"]
  assert moe["wi"].shape == (16, 64, 64) and moe["shared_experts"]["wi"].shape == (64, 64)


def _moe_config(config, **parallel):
  config.moe.update(num_experts=8, top_k=1, expert_interval=2)
  config.parallel.update(data=1, fsdp=1, expert=1, tensor=1)
  config.parallel.update(**parallel)
  return config


@pytest.fixture(scope="module")
def single_device_losses():
  """10 steps of the ``tiny_config`` GPT with MoE in every layer, on one device."""
  config = default_config()
  config.update(steps=10, batch_size=16, seq_len=32, sample_tokens=0)
  config.model.update(num_layers=2, num_heads=4, d_model=64, d_ff=256, max_seq_len=32)
  config.optim.warmup = 2
  return train_losses(_moe_config(config), 10, devices=jax.devices()[:1])[0]


@pytest.mark.parametrize("parallel,zero_stage", [
    (dict(expert=8), 0),
    (dict(expert=4, data=2), 1),
    (dict(expert=2, data=2, tensor=2), 3),
])
def test_expert_parallel_equals_single_device(tiny_config, single_device_losses, parallel,
                                              zero_stage):
  config = _moe_config(tiny_config, **parallel)
  config.zero.stage = zero_stage
  losses, _, state = train_losses(config, 10)
  # RTS is on; its noise is drawn over the global batch, so every mesh sees the same.
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-4)
  wi = state.params["layer_1"]["moe"]["wi"]
  assert "expert" in str(wi.sharding.spec[0])  # experts split over the expert axis
  assert wi.addressable_shards[0].data.shape[0] <= 8 // parallel["expert"]


@pytest.fixture(scope="module")
def single_device_dropless_losses():
  """The ``single_device_losses`` run with ``moe.drop_tokens=False``."""
  config = default_config()
  config.update(steps=10, batch_size=16, seq_len=32, sample_tokens=0)
  config.model.update(num_layers=2, num_heads=4, d_model=64, d_ff=256, max_seq_len=32)
  config.optim.warmup = 2
  config = _moe_config(config)
  config.moe.drop_tokens = False
  return train_losses(config, 10, devices=jax.devices()[:1])[0]


@pytest.mark.parametrize("parallel", [dict(expert=8), dict(expert=4, data=2)])
def test_dropless_expert_parallel_equals_single_device(tiny_config, single_device_dropless_losses,
                                                       parallel):
  config = _moe_config(tiny_config, **parallel)
  config.moe.drop_tokens = False
  losses, setup, state = train_losses(config, 10)
  np.testing.assert_allclose(losses, single_device_dropless_losses, rtol=1e-4)
  wi = state.params["layer_1"]["moe"]["wi"]
  assert "expert" in str(wi.sharding.spec[0])
  assert wi.addressable_shards[0].data.shape[0] == 8 // parallel["expert"]
  with jax.set_mesh(setup.mesh):  # one more step, for its metrics (it donates ``state``)
    _, metrics = setup.train_step(state, setup.to_device(setup.train_data.next_batch()))
  assert float(metrics["moe_dropped_fraction"]) == 0.0
  assert int(np.sum(metrics["moe_expert_tokens"])) == 16 * 32  # one MoE layer, top-1


def test_dropless_expert_parallel_keeps_a_full_shard():
  """Almost every token picks both experts of shard 0 (ep 4, 2 experts each): its buffer is
  full, and each token still gets Σ_j w_j · expert_j(x)."""
  num_experts, d, f = 8, 16, 32
  w = random_expert_weights(jax.random.PRNGKey(0), num_experts, d, f)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 4, d))
  experts = np.tile(np.asarray([0, 1], np.int32), (8, 4, 1))
  experts[0, 0], experts[5, 3], experts[7, 1] = (7, 0), (3, 4), (1, 6)
  weights = jax.random.uniform(jax.random.PRNGKey(2), (8, 4, 2))
  mesh = make_mesh(dict(expert=4, data=2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(compute_rules()):
    y, fell_back = jax.jit(expert_parallel_dropless)(x, jnp.asarray(experts), weights, w)
  assert not bool(fell_back)  # exact buffers only: nothing to fall back from
  p = {k: np.asarray(v) for k, v in w._asdict().items()}
  expected = np.zeros((8, 4, d), np.float32)
  for b, s in np.ndindex(8, 4):
    for e, weight in zip(experts[b, s], np.asarray(weights[b, s])):
      expected[b, s] += weight * _expert(p, e, np.asarray(x[b, s]))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)
  single, _ = dropless_experts(x.reshape(32, d), jnp.asarray(experts).reshape(32, 2),
                               weights.reshape(32, 2), w)
  np.testing.assert_allclose(np.asarray(single).reshape(8, 4, d), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key,overrides,parallel", [
    ("moe.num_experts", dict(num_experts=6), dict(expert=4, data=2)),
    ("moe.top_k", dict(num_experts=4, top_k=5), {}),
    ("moe.noisy_gate_policy", dict(num_experts=4, noisy_gate_policy="Gaussian"), {}),
    ("moe.layer_num_experts", dict(layer_num_experts=(4, 8, 8)), {}),
    ("parallel.expert", {}, dict(expert=2, data=4)),
    ("moe.expert_d_ff", dict(num_experts=4, expert_d_ff=33), dict(tensor=2, data=4)),
])
def test_bad_moe_configs(tiny_config, key, overrides, parallel):
  tiny_config.moe.update(**overrides)
  tiny_config.parallel.update(data=8 if not parallel else 1, fsdp=1, tensor=1)
  tiny_config.parallel.update(**parallel)
  with pytest.raises(ConfigError) as error:
    validate(tiny_config, 8)
  assert error.value.key == key


def test_kd_loss_is_temperature_scaled_kl():
  teacher = jnp.log(jnp.asarray([[[0.75, 0.25], [0.5, 0.5]]]))
  student = jnp.zeros((1, 2, 2))
  # KL(p‖q) of p = (.75, .25) against uniform q, plus 0 for the second token.
  kl = 0.75 * np.log(0.75 / 0.5) + 0.25 * np.log(0.25 / 0.5)
  np.testing.assert_allclose(float(kd_loss_sum(student, teacher, 1.0)), kl, rtol=1e-5)
  # At T = 2 the teacher softens to p ∝ (√.75, √.25); the sum is scaled by T².
  p = np.sqrt([0.75, 0.25]) / np.sqrt([0.75, 0.25]).sum()
  expected = 4 * np.sum(p * np.log(p / 0.5))
  np.testing.assert_allclose(float(kd_loss_sum(student, teacher, 2.0)), expected, rtol=1e-5)
  masked = kd_loss_sum(student, teacher, 1.0, mask=jnp.asarray([[0.0, 1.0]]))
  assert abs(float(masked)) < 1e-6


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_train_objective_adds_weighted_kd_term():
  """MoS: objective / tokens = α·CE + coef·Σ l_aux + β·T²·KL(softmax(t/T) ‖ softmax(s/T)),
  token means, with the KL computed here from the student's logits."""
  cfg = ModelConfig(num_layers=2, d_model=32, d_ff=64, num_heads=2, max_seq_len=8,
                    moe=MoeConfig(num_experts=4, expert_interval=1))
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 256)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  student = np.asarray(jax.jit(model.apply)({"params": params}, tokens), np.float64)
  teacher = 3 * jax.random.normal(jax.random.PRNGKey(2), student.shape)
  batch = {"inputs": tokens, "targets": tokens, "teacher_logits": teacher}
  kd = Distillation(temperature=2.0, alpha_ce=0.5, beta_ce=3.0)
  objective, sums = jax.jit(lambda p, b: loss_sum_fn(model, aux_loss_coef=0.1, distillation=kd)(
      p, b, None, True))(params, batch)
  log_p = _log_softmax(np.asarray(teacher, np.float64) / 2)
  log_q = _log_softmax(student / 2)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)  # [B, S]
  ce = -np.take_along_axis(_log_softmax(student), np.asarray(tokens)[..., None], -1)
  n = tokens.size
  np.testing.assert_allclose(float(sums["kd_sum"]) / n, 4 * kl.mean(), rtol=1e-4)
  np.testing.assert_allclose(float(sums["loss_sum"]) / n, ce.mean(), rtol=1e-4)
  aux = float(sums["moe_aux_sum"]) / n
  assert aux > 1.9  # two MoE layers, each l_aux >= 1
  np.testing.assert_allclose(float(objective) / n,
                             0.5 * ce.mean() + 0.1 * aux + 3.0 * 4 * kl.mean(), rtol=1e-4)


def test_param_counts_activate_top_k_experts():
  cfg = ModelConfig(num_layers=2, d_model=16, d_ff=32, num_heads=2, max_seq_len=8,
                    moe=MoeConfig(num_experts=4, top_k=2))
  params = jax.eval_shape(GPT(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  counts = param_counts(nn.meta.unbox(params["params"]), top_k=2)
  experts = 4 * (16 * 32 + 32 + 32 * 16 + 16)  # layer_1's wi, wi_bias, wo, wo_bias
  assert counts["expert_params"] == experts
  assert counts["params"] - counts["active_params"] == experts // 2


@pytest.mark.parametrize("mix", ["sum", "learned"])
def test_residual_moe_adds_the_dense_mlp_to_the_gated_expert(mix):
  """Residual-MoE: the top-1 expert weighted by its gate probability, plus the dense MLP
  (``sum``), or the two mixed per token by softmax(x W + b) (``learned``)."""
  cfg = ModelConfig(d_model=16, d_ff=32, num_heads=2)
  moe = MoeConfig(num_experts=4, drop_tokens=False, use_residual=True, residual_mix=mix)
  layer = MoeMlp(cfg, moe, 4)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16))
  params = nn.meta.unbox(jax.jit(layer.init, static_argnums=2)(jax.random.PRNGKey(1), x, True))
  p = jax.tree.map(np.asarray, params["params"])
  y = jax.jit(lambda p, x: layer.apply(p, x, True, mutable=["moe"])[0])(params, x)
  expected = np.zeros((8, 16), np.float32)
  for t, token in enumerate(np.asarray(x).reshape(8, 16)):
    logits = token @ p["gate"]
    gates = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    routed = gates.max() * np.asarray(_expert(p, gates.argmax(), token))
    mlp = p["residual_mlp"]
    dense_out = (np.asarray(jax.nn.gelu(token @ mlp["wi"] + mlp["wi_bias"])) @ mlp["wo"]
                 + mlp["wo_bias"])
    if mix == "sum":
      expected[t] = routed + dense_out
    else:
      c = token @ p["residual_coef"] + p["residual_coef_bias"]
      c = np.exp(c - c.max()) / np.exp(c - c.max()).sum()
      expected[t] = c[0] * routed + c[1] * dense_out
  np.testing.assert_allclose(np.asarray(y).reshape(8, 16), expected, rtol=1e-4, atol=1e-5)


def test_pyramid_gives_each_moe_layer_its_expert_count():
  """PR-MoE: ``layer_num_experts`` (2, 4) on 4 layers, interval 2: layer 1 has 2 experts
  (and the residual MLP), layer 3 has 4; layers 0 and 2 keep the dense MLP; every token
  is routed once per MoE layer."""
  cfg = ModelConfig(num_layers=4, d_model=16, d_ff=32, num_heads=2, max_seq_len=8,
                    moe=MoeConfig(layer_num_experts=(2, 4), use_residual=True))
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 256)
  params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
  shapes = jax.tree.map(lambda a: a.shape, nn.meta.unbox(params))
  assert shapes["layer_1"]["moe"]["wi"] == (2, 16, 32)
  assert shapes["layer_3"]["moe"]["wi"] == (4, 16, 32)
  assert shapes["layer_1"]["moe"]["residual_mlp"]["wi"] == (16, 32)
  assert "moe" not in shapes["layer_0"] and "moe" not in shapes["layer_2"]
  _, sums = jax.jit(lambda p, b, key: loss_sum_fn(model)(p, b, {"moe": key}, True))(
      params, {"inputs": tokens, "targets": tokens}, jax.random.PRNGKey(2))
  counts = np.asarray(sums["moe_expert_tokens"])
  assert counts.shape == (6,) and counts[:2].sum() == counts[2:].sum() == 16
