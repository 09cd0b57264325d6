"""1-bit Adam, 1-bit LAMB, 0/1 Adam and the compressed all-reduce behind them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, train_losses

import jaxspeed
from jaxspeed.checkpoint import Checkpointer
from jaxspeed.comm import WorkerGroup, packed_bytes_per_worker, padded_size
from jaxspeed.errors import ConfigError
from jaxspeed.optimizers import (
  COMPRESSED,
  LOCAL,
  ONEBIT_GRADIENT,
  SYNC,
  VARIANCE,
  WARMUP,
  onebit_adam,
  onebit_lamb,
  zero_one_adam,
  zero_one_kinds,
)
from jaxspeed.parallel import make_mesh


def _sign(x):
  return np.where(x >= 0, 1.0, -1.0)


def _onebit_allreduce_numpy(xs: np.ndarray, worker_errors, server_errors):
  """The algorithm written out per worker with numpy loops, for one vector."""
  world, n = xs.shape
  size = worker_errors.shape[1]
  chunk = size // world
  compressed, scales = [], []
  for w in range(world):
    x = np.pad(xs[w], (0, size - n)) + worker_errors[w]
    scales.append(np.linalg.norm(x) / math.sqrt(size))
    compressed.append(_sign(x))
    worker_errors[w] = x - scales[w] * compressed[w]
  served = []
  for j in range(world):
    y = sum(scales[w] * compressed[w][j * chunk:(j + 1) * chunk] for w in range(world)) / world
    y = y + server_errors[j]
    scale = np.linalg.norm(y) / math.sqrt(chunk)
    server_errors[j] = y - scale * _sign(y)
    served.append(scale * _sign(y))
  return np.concatenate(served)[:n]


def test_padding_is_a_multiple_of_world_times_lcm_with_8():
  assert padded_size(3, 2) == 16
  assert padded_size(16, 2) == 16
  assert padded_size(17, 2) == 32
  assert padded_size(5, 3) == 72
  assert padded_size(100, 4) == 128
  assert packed_bytes_per_worker(3, 2)["phase1_signs"] == 1  # 8-element chunk = 1 byte


def test_hand_computed_two_workers_with_padding():
  """P=2, n=3: padded to 16; worked out on paper in the comments."""
  group = WorkerGroup(2)
  x = {"v": jnp.array([[1.0, -2.0, 3.0], [3.0, 2.0, -1.0]])}
  errors = group.error_feedback({"v": jnp.zeros(3)})
  mean, errors = group.compressed_mean(x, errors)
  # Both workers: scale a = sqrt(14/16); signs (+-+ and ++-, padding +).
  a = math.sqrt(14) / 4
  # Server 0 averages elements 0..7: [a, 0, 0, a, a, a, a, a] -> scale a·sqrt(6/8), all +.
  # Server 1 averages elements 8..15: all a -> scale a.
  np.testing.assert_allclose(mean["v"], [a * math.sqrt(0.75)] * 3, rtol=1e-6)
  worker0 = np.zeros(16)
  worker0[:3] = [1 - a, -2 + a, 3 - a]
  worker0[3:] = -a
  np.testing.assert_allclose(errors[0].worker[0], worker0, rtol=1e-6, atol=1e-7)
  server0 = np.array([a, 0, 0, a, a, a, a, a]) - a * math.sqrt(0.75)
  np.testing.assert_allclose(errors[0].server[0], server0, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(errors[0].server[1], np.zeros(8), atol=1e-7)


@pytest.mark.parametrize("world,n", [(2, 37), (4, 100), (4, 5)])
def test_matches_per_worker_numpy_algorithm_over_repeated_calls(world, n):
  rng = np.random.default_rng(world * n)
  group = WorkerGroup(world)
  errors = group.error_feedback({"v": jnp.zeros(n)})
  worker_errors = np.zeros((world, padded_size(n, world)))
  server_errors = np.zeros((world, padded_size(n, world) // world))
  reduce = jax.jit(group.compressed_mean)
  for _ in range(3):
    xs = rng.normal(size=(world, n))
    mean, errors = reduce({"v": jnp.asarray(xs, jnp.float32)}, errors)
    expected = _onebit_allreduce_numpy(xs, worker_errors, server_errors)
    np.testing.assert_allclose(mean["v"], expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(errors[0].worker, worker_errors, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(errors[0].server, server_errors, rtol=2e-5, atol=2e-6)


def test_error_feedback_makes_the_running_average_converge_to_the_true_mean():
  group = WorkerGroup(4)
  xs = {"a": jax.random.normal(jax.random.PRNGKey(0), (4, 40)),
        "b": jax.random.normal(jax.random.PRNGKey(1), (4, 7, 3))}
  true = jax.tree.map(lambda x: x.mean(0), xs)
  errors = group.error_feedback(true)
  reduce = jax.jit(group.compressed_mean)
  total = jax.tree.map(jnp.zeros_like, true)
  gaps = {}
  for i in range(1, 201):
    mean, errors = reduce(xs, errors)
    total = jax.tree.map(jnp.add, total, mean)
    if i in (1, 10, 200):
      gaps[i] = max(jax.tree.leaves(jax.tree.map(
          lambda t, m, i=i: float(jnp.max(jnp.abs(t / i - m))), total, true)))
  assert gaps[200] < gaps[10] / 5 < gaps[1] / 5
  assert gaps[200] < 0.03


def _mesh(**axes):
  config = jaxspeed.default_config().parallel
  config.data = 1
  for k, v in axes.items():
    config[k] = v
  return make_mesh(config, jax.devices())


def test_mesh_equals_single_process_simulation_and_packs_bits_on_the_wire():
  mesh = _mesh(data=4, fsdp=2)
  specs = {"a": jax.sharding.PartitionSpec(), "b": jax.sharding.PartitionSpec()}
  on_mesh, simulated = WorkerGroup.on_mesh(mesh, specs), WorkerGroup(8)
  xs = {"a": jax.random.normal(jax.random.PRNGKey(0), (8, 100)),
        "b": jax.random.normal(jax.random.PRNGKey(1), (8, 6, 5))}
  params = jax.tree.map(lambda x: x[0], xs)
  with jax.set_mesh(mesh):
    reduce = jax.jit(on_mesh.compressed_mean)
    mesh_errors = on_mesh.error_feedback(params)
    sim_errors = simulated.error_feedback(params)
    for _ in range(3):
      got, mesh_errors = reduce(xs, mesh_errors)
      want, sim_errors = simulated.compressed_mean(xs, sim_errors)
      assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    hlo = reduce.lower(xs, mesh_errors).compile().as_text()
  # One all-to-all of packed bytes for both tensors: chunks of 128/8 and 64/8 elements' bits.
  chunk_bytes = (padded_size(100, 8) + padded_size(30, 8)) // 8 // 8
  assert f"u8[8,{chunk_bytes}]" in hlo and "all-to-all" in hlo
  assert "f32[8,100]" not in hlo.split("all-to-all")[1].split("\n")[0]


def _adam_grads(num, shape=(6, 8), world=None, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), num)
  lead = () if world is None else (world,)
  return [{"w": jax.random.normal(k, (*lead, *shape)), "b": jax.random.normal(k, (*lead, 8))}
          for k in keys]


def test_onebit_adam_warmup_is_deepspeed_adam_and_bias_corrected_option_is_optax_adam():
  params = {"w": jnp.ones((6, 8)), "b": jnp.zeros(8)}
  grads = _adam_grads(5)
  opt = onebit_adam(WorkerGroup(2), freeze_step=10, b1=0.9, b2=0.99, eps=1e-6,
                    weight_decay=0.1)
  state = opt.init(params)
  m = v = jax.tree.map(jnp.zeros_like, params)
  for g in grads:
    updates, state = opt.update(g, state, params, kind=WARMUP, learning_rate=0.5)
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
    v = jax.tree.map(lambda v, g: 0.99 * v + 0.01 * g * g, v, g)
    expected = jax.tree.map(lambda m, v, p: -0.5 * (m / (jnp.sqrt(v) + 1e-6) + 0.1 * p),
                            m, v, params)
    assert_trees_close(updates, expected, rtol=1e-6)

  corrected = onebit_adam(WorkerGroup(2), freeze_step=10, b1=0.9, b2=0.99, eps=1e-6,
                          bias_correction=True)
  reference = optax.adam(0.5, b1=0.9, b2=0.99, eps=1e-6)
  state, ref_state = corrected.init(params), reference.init(params)
  for g in grads:
    updates, state = corrected.update(g, state, params, kind=WARMUP, learning_rate=0.5)
    expected, ref_state = reference.update(g, ref_state, params)
    assert_trees_close(updates, expected, rtol=1e-5, atol=1e-7)


def test_onebit_adam_freezes_variance_and_averages_momentum_after_freeze_step():
  world = 4
  group = WorkerGroup(world)
  params = {"w": jnp.ones((6, 8)), "b": jnp.zeros(8)}
  opt = onebit_adam(group, freeze_step=2)
  assert [opt.kind_at(s) for s in range(4)] == [WARMUP, WARMUP, COMPRESSED, COMPRESSED]
  state = opt.init(params)
  for g in _adam_grads(2):
    _, state = opt.update(g, state, params, kind=WARMUP, learning_rate=1e-3)
  nu = state.nu
  for g in _adam_grads(3, world=world, seed=1):
    mu_before = state.mu
    updates, state = opt.update(g, state, params, kind=COMPRESSED, learning_rate=1e-3)
    assert_trees_close(state.nu, nu, rtol=0)
    local = jax.tree.map(lambda m, g: 0.9 * m[None] + 0.1 * g, mu_before, g)
    # The new momentum is the 1-bit estimate of the workers' mean local momentum.
    got, want = np.ravel(state.mu["w"]), np.ravel(local["w"].mean(0))
    assert np.corrcoef(got, want)[0, 1] > 0.5
    expected = jax.tree.map(lambda m, v: -1e-3 * m / (jnp.sqrt(v) + 1e-8), state.mu, nu)
    assert_trees_close(updates, expected, rtol=1e-6)


def test_one_worker_onebit_adam_after_freeze_is_exact_adam_with_frozen_variance():
  # DeepSpeed skips compression at world size 1; by hand with b1 = 0.5, b2 = 0.75:
  # step 1 (warm-up), g = (2, -4): m = (1, -2), v = 0.25·g² = (1, 4).
  # step 2 (compressed), g = (6, 0): m = 0.5·m + 0.5·g = (3.5, -1), v frozen,
  # update = -m/√v = (-3.5, 0.5). A 1-bit message would give ±one scale instead.
  params = {"w": jnp.array([1.0, 2.0])}
  opt = onebit_adam(WorkerGroup(1), freeze_step=1, b1=0.5, b2=0.75, eps=1e-12)
  state = opt.init(params)
  _, state = opt.update({"w": jnp.array([2.0, -4.0])}, state, params, kind=WARMUP,
                        learning_rate=1.0)
  assert opt.kind_at(1) == COMPRESSED
  updates, state = opt.update({"w": jnp.array([[6.0, 0.0]])}, state, params, kind=COMPRESSED,
                              learning_rate=1.0)
  np.testing.assert_allclose(updates["w"], [-3.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(state.nu["w"], [1.0, 4.0], rtol=1e-6)
  for e in jax.tree.leaves(state.errors):  # nothing was left out of a message
    assert not np.any(e)


def test_one_worker_lamb_and_zero_one_adam_average_exactly():
  params = {"w": jnp.full((6, 8), 0.5), "b": jnp.full((8,), 0.1)}
  g = _adam_grads(1, world=1, seed=2)[0]
  lamb = onebit_lamb(WorkerGroup(1), freeze_step=1)
  state = lamb.init(params)
  _, state = lamb.update(jax.tree.map(lambda x: x[0], g), state, params, kind=WARMUP,
                         learning_rate=1e-3)
  _, after = lamb.update(g, state, params, kind=COMPRESSED, learning_rate=1e-3)
  # momentum scaled and unscaled, not compressed
  assert_trees_close(after.mu, jax.tree.map(lambda prev, gw: 0.9 * prev + 0.1 * gw[0],
                                            state.mu, g), rtol=1e-5)
  zero_one = zero_one_adam(WorkerGroup(1), var_freeze_step=4)
  state = zero_one.init(params)
  _, state = zero_one.update(jax.tree.map(lambda x: x[0], g), state, params, kind=VARIANCE,
                             learning_rate=1e-3)
  g2 = _adam_grads(1, world=1, seed=3)[0]
  _, state = zero_one.update(g2, state, params, kind=ONEBIT_GRADIENT, learning_rate=1e-3)
  assert_trees_close(state.mu, jax.tree.map(lambda g1, gw: 0.09 * g1 + 0.1 * gw, g, g2),
                     rtol=1e-5)  # the exact gradient


@pytest.mark.parametrize("fused", [False, True])
def test_one_worker_compressed_mean_is_the_value_itself_on_a_mesh_too(fused):
  xs = {"a": jax.random.normal(jax.random.PRNGKey(0), (1, 37)),
        "b": jax.random.normal(jax.random.PRNGKey(1), (1, 3, 5))}
  params = jax.tree.map(lambda x: x[0], xs)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  specs = {"a": jax.sharding.PartitionSpec(), "b": jax.sharding.PartitionSpec()}
  for group in (WorkerGroup(1), WorkerGroup.on_mesh(mesh, specs)):
    with jax.set_mesh(mesh):
      got, _ = jax.jit(group.compressed_mean, static_argnums=2)(
          xs, group.error_feedback(params, fused), fused)
    assert_trees_close(got, params, atol=0, rtol=0)


def test_onebit_lamb_warmup_matches_hand_written_lamb_and_coefficient_ema():
  params = {"w": jnp.full((6, 8), 0.5), "b": jnp.zeros(8)}
  opt = onebit_lamb(WorkerGroup(2), freeze_step=3, b1=0.9, b2=0.99, eps=1e-6,
                    weight_decay=0.01, max_coeff=0.3, min_coeff=0.01, coeff_beta=0.9)
  state = opt.init(params)
  m = {k: np.zeros(p.shape) for k, p in params.items()}
  v = {k: np.zeros(p.shape) for k, p in params.items()}
  ema = {"w": 0.0, "b": 0.0}
  for g in _adam_grads(3):
    updates, state = opt.update(g, state, params, kind=WARMUP, learning_rate=0.1)
    for k in params:
      p, gk = np.asarray(params[k]), np.asarray(g[k])
      m[k] = 0.9 * m[k] + 0.1 * gk
      v[k] = 0.99 * v[k] + 0.01 * gk * gk
      u = m[k] / (np.sqrt(v[k]) + 1e-6) + (0.01 * p if k == "w" else 0)
      pn, un = np.linalg.norm(p), np.linalg.norm(u)
      c = 1.0 if pn == 0 or un == 0 else min(max(pn / un, 0.01), 0.3)
      if c != 1.0:
        ema[k] = 0.9 * ema[k] + 0.1 * c
      np.testing.assert_allclose(updates[k], -0.1 * c * u, rtol=1e-5, atol=1e-8)
      np.testing.assert_allclose(state.coeff_freeze[k], ema[k], rtol=1e-5)
  # v_fresh is v at the last warm-up update; "b" has zero weight norm, so c = 1.
  np.testing.assert_allclose(state.nu_fresh["w"], state.nu["w"])
  assert float(state.coeff_freeze["b"]) == 0.0


def test_onebit_lamb_compression_stage_factor_bounds_and_frozen_variance():
  world = 4
  params = {"w": jnp.full((6, 8), 0.5), "b": jnp.full((8,), 0.1)}
  opt = onebit_lamb(WorkerGroup(world), freeze_step=2, factor_threshold=0.1)
  state = opt.init(params)
  for g in _adam_grads(2):
    _, state = opt.update(g, state, params, kind=WARMUP, learning_rate=1e-3)
  nu, coeff = state.nu, state.coeff_freeze
  last = {"w": 1.0, "b": 1.0}
  for i, g in enumerate(_adam_grads(4, world=world, seed=3)):
    _, state = opt.update(g, state, params, kind=COMPRESSED, learning_rate=1e-3)
    for k in params:
      np.testing.assert_array_equal(state.nu[k], nu[k])
      f = float(state.last_factor[k])
      assert 0.5 <= f <= 4.0 and abs(f - last[k]) <= 0.1 * last[k] + 1e-6
      last[k] = f
      assert float(state.coeff_freeze[k]) == float(coeff[k])
    if i == 0:  # scaling coefficients are set once, from the momentum RMS
      rms = {k: float(jnp.linalg.norm(m) / math.sqrt(m.size)) for k, m in state.mu.items()}
      scaling = dict(state.scaling)
  for k in params:
    assert float(state.scaling[k]) == float(scaling[k])
  assert rms  # computed at the first compressed step


def test_zero_one_adam_schedule_follows_the_reference_rules():
  kinds = zero_one_kinds(400, var_freeze_step=300, var_update_scaler=16, local_step_scaler=20,
                         local_step_clipper=4)
  # Variance steps: intervals 1 (x16), 2 (x16), 4 (x16), 8, ...
  expected = list(range(1, 17)) + list(range(18, 49, 2)) + list(range(52, 113, 4))
  expected += list(range(120, 241, 8))
  expected += [256, 272, 288]
  variance = [t for t, k in enumerate(kinds, 1) if k == VARIANCE]
  assert variance == expected
  assert all(k in (VARIANCE, ONEBIT_GRADIENT) for k in kinds[:300])
  # Phase 2: interval 1 for 20 steps, then 2 for 20, then capped at 4.
  sync = [t for t, k in enumerate(kinds, 1) if k == SYNC]
  want = list(range(301, 321)) + [t for t in range(321, 341) if t % 2 == 0]
  want += [t for t in range(341, 401) if t % 4 == 0]
  assert sync == want
  assert all(k in (SYNC, LOCAL) for k in kinds[300:])


def test_zero_one_adam_phase_one_is_adam_and_local_steps_accumulate():
  world = 2
  group = WorkerGroup(world)
  params = {"w": jnp.ones((6, 8)), "b": jnp.zeros(8)}
  opt = zero_one_adam(group, var_freeze_step=2, b1=0.9, b2=0.99, eps=1e-6,
                      local_step_scaler=100, local_step_clipper=4)
  state = opt.init(params)
  m = v = jax.tree.map(jnp.zeros_like, params)
  for g in _adam_grads(2):
    updates, state = opt.update(g, state, params, kind=VARIANCE, learning_rate=0.5)
    m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
    v = jax.tree.map(lambda v, g: 0.99 * v + 0.01 * g * g, v, g)
    expected = jax.tree.map(lambda m, v: -0.5 * m / (jnp.sqrt(v) + 1e-6), m, v)
    assert_trees_close(updates, expected, rtol=1e-6)
  nu = state.nu
  g = _adam_grads(1, world=world, seed=5)[0]
  updates, local_state = opt.update(g, state, params, kind=LOCAL, learning_rate=0.5)
  for u in jax.tree.leaves(updates):
    assert not np.any(u)  # synchronized parameters do not move on a local step
  expected_mu = jax.tree.map(lambda m, g: 0.9 * m[None] + 0.1 * g, m, g)
  assert_trees_close(local_state.mu, expected_mu, rtol=1e-6)
  expected_acc = jax.tree.map(lambda m, v: -0.5 * m / (jnp.sqrt(v[None]) + 1e-6),
                              expected_mu, nu)
  assert_trees_close(local_state.accumulated, expected_acc, rtol=1e-6)
  own = opt.worker_params(params, local_state, LOCAL)
  np.testing.assert_allclose(own["w"], params["w"][None] + local_state.accumulated["w"])
  updates, synced = opt.update(g, local_state, params, kind=SYNC, learning_rate=0.5)
  assert float(synced.lr_sum) == 0.0
  for a in jax.tree.leaves(synced.accumulated):
    assert not np.any(a)
  assert_trees_close(synced.nu, nu, rtol=0)
  for mu in jax.tree.leaves(synced.mu):  # reconstructed momentum agrees across workers
    np.testing.assert_array_equal(mu[0], mu[1])


@pytest.mark.parametrize("kwargs,key", [
    ({"name": "onebit_adam", "freeze_step": -1}, "optim.freeze_step"),
    ({"name": "onebit_lamb", "factor_min": 5.0}, "optim.factor_min"),
    ({"name": "onebit_lamb", "min_coeff": 20.0}, "optim.min_coeff"),
    ({"name": "zero_one_adam", "var_update_scaler": 0}, "optim.var_update_scaler"),
    ({"name": "zero_one_adam", "local_step_clipper": -2}, "optim.local_step_clipper"),
    ({"name": "onebit_adam", "zero_quantized_weights": True}, "zero.quantized_weights"),
])
def test_bad_hyperparameters_are_rejected_before_compiling(tiny_config, kwargs, key):
  kwargs = dict(kwargs)
  if kwargs.pop("zero_quantized_weights", False):
    tiny_config.zero.update(stage=3, quantized_weights=True)
  for k, v in kwargs.items():
    tiny_config.optim[k] = v
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    jaxspeed.build(tiny_config)


def test_onebit_adam_before_freeze_trains_exactly_like_adam(tiny_config):
  tiny_config.optim.weight_decay = 0.0
  tiny_config.parallel.data = 4
  tiny_config.parallel.tensor = 2
  tiny_config.optim.name = "adam"
  reference, _, _ = train_losses(tiny_config, 4)
  tiny_config.optim.name = "onebit_adam"
  tiny_config.optim.bias_correction = True
  tiny_config.optim.freeze_step = 100
  losses, _, _ = train_losses(tiny_config, 4)
  np.testing.assert_allclose(losses, reference, rtol=2e-6)


@pytest.mark.parametrize("name", ["onebit_adam", "onebit_lamb", "zero_one_adam"])
def test_each_optimizer_trains_on_a_tensor_parallel_zero3_mesh(tiny_config, name):
  tiny_config.parallel.data = 2
  tiny_config.parallel.fsdp = 2
  tiny_config.parallel.tensor = 2
  tiny_config.zero.stage = 3
  tiny_config.optim.name = name
  tiny_config.optim.learning_rate = 3e-3 if name != "onebit_lamb" else 2e-2
  tiny_config.optim.freeze_step = 3
  tiny_config.optim.var_freeze_step = 4
  tiny_config.optim.var_update_scaler = 1
  tiny_config.optim.local_step_scaler = 2
  tiny_config.optim.local_step_clipper = 2
  tiny_config.microbatches = 2 if name == "zero_one_adam" else 1
  tiny_config.model.num_layers = 1  # still every sharding of a layer; a third less to compile
  losses, setup, _ = train_losses(tiny_config, 10)
  assert losses[-1] < losses[0] - 0.2
  expected = {"onebit_adam": {WARMUP, COMPRESSED}, "onebit_lamb": {WARMUP, COMPRESSED},
              "zero_one_adam": {VARIANCE, ONEBIT_GRADIENT, SYNC, LOCAL}}[name]
  assert {kind for kind, _ in setup.train_step.kinds_built} == expected  # one program per kind
  assert setup.train_step.compilations == len(expected)


def test_onebit_adam_with_zero3_equals_zero1(tiny_config):
  """ZeRO-3 splits the parameters (and ZeRO-2 the gradient buffers) the 1-bit step
  gathers per worker: warm-up and compressed steps train as under ZeRO-1, and the
  parameters at rest are split over the data axes."""
  tiny_config.parallel.update(data=2, fsdp=2, tensor=2)
  tiny_config.optim.update(name="onebit_adam", freeze_step=2)
  tiny_config.model.num_layers = 1
  tiny_config.zero.stage = 1
  expected, _, reference = train_losses(tiny_config, 4)
  tiny_config.zero.stage = 3
  losses, _, state = train_losses(tiny_config, 4)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  assert_trees_close(state.opt_state, reference.opt_state, rtol=1e-5, atol=1e-7)
  wi = state.params["layer_0"]["mlp"]["wi"]
  assert wi.addressable_shards[0].data.size * 8 == wi.size  # data x fsdp x tensor


@pytest.mark.parametrize("name", ["onebit_lamb", "zero_one_adam"])
def test_save_and_restore_in_compression_phase_continues_exactly(tiny_config, tmp_path, name):
  """Error feedback, fused-momentum scaling and per-worker local state survive a checkpoint."""
  config = tiny_config
  config.optim.name = name
  config.optim.freeze_step = 2
  config.optim.var_freeze_step = 2
  config.optim.local_step_scaler = 2
  config.optim.local_step_clipper = 4
  config.zero.stage = 1
  config.model.num_layers = 1  # every kind of state leaf still; a third less to compile
  setup = jaxspeed.build(config)
  batches = [setup.train_data.batch_at(i) for i in range(10)]
  checkpointer = Checkpointer(str(tmp_path), keep=1)
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    for step in range(10):
      if step == 7:  # 0/1 Adam: after a local step, with an accumulated update pending
        checkpointer.save(step, state, {})
        checkpointer.close()
      state, _ = setup.train_step(state, setup.to_device(batches[step]), step)
    restored, _ = Checkpointer(str(tmp_path)).restore(7, setup.abstract_state())
    for step in range(7, 10):
      restored, _ = setup.train_step(restored, setup.to_device(batches[step]), step)
  assert name != "zero_one_adam" or np.any(np.asarray(state.opt_state.accumulated["embed"]
                                                      ["table"]))
  assert_trees_close(restored, state, rtol=0)


def test_segmented_compression_equals_per_tensor_compression_bit_for_bit():
  """The vectorized CPU path and the per-segment path (Pallas kernel on GPU) agree."""
  from jaxspeed.comm.onebit_allreduce import compress_segments
  from pallas_kernels import onebit

  chunks = [8, 24, 16]
  segments = np.repeat(np.arange(3), chunks)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, sum(chunks)))
  e = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (4, sum(chunks)))
  packed, scales, errors = compress_segments(x, e, segments, 3)
  lo = 0
  for t, c in enumerate(chunks):
    bits, scale, err = onebit.compress_reference(x[:, lo:lo + c].reshape(-1),
                                                 e[:, lo:lo + c].reshape(-1))
    np.testing.assert_array_equal(packed[:, lo // 8:(lo + c) // 8].reshape(-1), bits)
    np.testing.assert_allclose(scales[t], scale, rtol=1e-6)
    np.testing.assert_allclose(errors[:, lo:lo + c].reshape(-1), err, rtol=1e-5, atol=1e-6)
    lo += c


def test_zero_one_adam_local_steps_apply_decoupled_weight_decay_exactly():
  """Worker parameters after a local step: (1 − lr·wd)·p_w − lr·m_w/(√v + ε)."""
  world, lr, wd = 2, 0.1, 0.5
  opt = zero_one_adam(WorkerGroup(world), var_freeze_step=1, weight_decay=wd,
                      local_step_scaler=100, local_step_clipper=4)
  params = {"w": jnp.full((4, 8), 2.0)}
  state = opt.init(params)
  updates, state = opt.update({"w": jnp.full((4, 8), 0.3)}, state, params, kind=VARIANCE,
                              learning_rate=lr)
  params = jax.tree.map(jnp.add, params, updates)
  for seed in range(2):
    g = _adam_grads(1, shape=(4, 8), world=world, seed=seed)[0]
    before = opt.worker_params(params, state, LOCAL)
    updates, state = opt.update({"w": g["w"]}, state, params, kind=LOCAL, learning_rate=lr)
    params = jax.tree.map(jnp.add, params, updates)
    after = opt.worker_params(params, state, LOCAL)
    expected = (1 - lr * wd) * before["w"] - lr * state.mu["w"] / (jnp.sqrt(state.nu["w"]) + 1e-8)
    np.testing.assert_allclose(after["w"], expected, rtol=1e-5, atol=1e-6)


def test_sketched_norm_estimates_the_norm_of_the_mean():
  from jaxspeed.comm.norm_sketch import count_sketch, mean_norm_estimate, sketch_size

  rng = np.random.default_rng(0)
  stacked = {"a": jnp.asarray(rng.normal(size=(8, 96, 64)) + rng.normal(size=(96, 64)),
                              jnp.float32),
             "b": jnp.asarray(rng.normal(size=(8, 512)), jnp.float32)}
  mean = jax.tree.map(lambda x: x.mean(0), stacked)
  # Linear: the mean of the workers' sketches is the sketch of the mean.
  sketches = jax.vmap(lambda tree: count_sketch(tree, 4096))(stacked)
  np.testing.assert_allclose(sketches.mean(0), count_sketch(mean, 4096), atol=1e-4)
  true = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(mean)))
  # 96·64 + 512 elements: k = 16 rounded up to 256; the norm's standard deviation is
  # about 1/sqrt(2·256) = 4.4%, so 15% is > 3 sigma.
  assert sketch_size(96 * 64 + 512) == 256 and sketch_size(10**7) == 4096
  assert sketch_size(842_496) == 2048
  assert abs(float(mean_norm_estimate(stacked)) / true - 1) < 0.15


def test_compressed_step_clips_by_the_norm_of_the_averaged_gradient(tiny_config):
  """On a compressed step the gradient norm (for clipping and the guard) is the averaged
  gradient's, as on an exact step from the same state and batch, not the larger
  root-mean-square of the 8 workers' noisy local norms (2 sequences each)."""
  tiny_config.optim.update(name="onebit_adam", freeze_step=1)
  tiny_config.model.num_layers = 1
  setup = jaxspeed.build(tiny_config)
  with jax.set_mesh(setup.mesh):
    batch = setup.to_device(setup.train_data.batch_at(0))
    norms = {kind: float(setup.train_step.for_kind((kind, None))(setup.init_state(), batch)[1][
        "grad_norm"]) for kind in (WARMUP, COMPRESSED)}
  # The local norms' root-mean-square would be 1.7-2x; the sketch is within a few percent.
  assert abs(norms[COMPRESSED] / norms[WARMUP] - 1) < 0.15
