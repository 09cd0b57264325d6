"""ZeRO-Offload: the optimizer state in host memory computes the run kept in device memory."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, train_losses, train_metrics

import jaxspeed
from jaxspeed.training import read_metrics
from jaxspeed.training.state import bytes_per_device

CASES = {
    # name: (optimizer, ZeRO stage, update on the host); ZeRO-1 runs in the resume test
    "adamw_zero3": ("adamw", 3, True),
    "lamb_zero3": ("lamb", 3, True),
    "onebit_adam_zero1": ("onebit_adam", 1, False),
}


def _configure(config, optimizer: str, stage: int, offload: str):
  config.parallel.update(data=2, fsdp=2, tensor=2)
  config.zero.stage = stage
  config.zero.offload_optimizer = offload
  config.optim.name = optimizer
  config.optim.freeze_step = 2  # 1-bit Adam compresses from the third step
  config.model.num_layers = 1
  return config


def _shard_bytes(tree) -> int:
  return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if "onebit" in c
                                               else []) for c in sorted(CASES)])
def test_offloaded_run_matches_device_run(case, tiny_config):
  optimizer, stage, host_update = CASES[case]
  steps = 4
  expected, _, reference = train_losses(_configure(tiny_config, optimizer, stage, "none"), steps)
  losses, setup, state = train_losses(_configure(tiny_config, optimizer, stage, "host"), steps)

  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  assert_trees_close(state.params, reference.params, rtol=1e-5, atol=1e-7)
  assert_trees_close(state.opt_state, reference.opt_state, rtol=1e-5, atol=1e-7)
  # Where each leaf lives: the optimizer state on the host, everything else on device.
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)} == {"pinned_host"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state.replace(opt_state=()))} == {
      "device"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(reference.opt_state)} == {"device"}
  # Same slices as without offload: only the memory kind changed.
  for leaf, ref in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(reference.opt_state),
                       strict=True):
    assert leaf.sharding.spec == ref.sharding.spec
  # The accounting counts the optimizer state's bytes per device as host memory.
  held = bytes_per_device(state)
  assert held["host"] == _shard_bytes(state.opt_state) > 0
  assert held == {"device": bytes_per_device(reference)["device"] - held["host"],
                  "host": held["host"]}
  assert bytes_per_device(reference)["host"] == 0
  # The update runs under compute_on("device_host") exactly for the optimizers that can.
  assert setup.specs.host_update == host_update
  with jax.set_mesh(setup.mesh):
    text = setup.train_step.lower(setup.abstract_state(),
                                  setup.to_device(setup.train_data.batch_at(0))).as_text()
  assert ('_xla_compute_type = "host"' in text) == host_update


def _losses(workdir) -> dict[int, float]:
  return {int(r["step"]): r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))}


def test_resume_moves_the_state_between_device_and_host(tiny_config, tmp_path):
  """A device-memory checkpoint resumes offloaded (orbax restores into pinned_host
  shardings), an offloaded one resumes in device memory, and both continue the run."""
  config = _configure(tiny_config, "adamw", 1, "host")
  config.log_every, config.checkpoint_every, config.eval_every = 1, 2, 6
  config.optim.decay = 6  # the schedule must not depend on where the run stops
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  config.steps = 6
  offloaded = jaxspeed.train(config, straight)

  config.zero.offload_optimizer, config.steps = "none", 2
  on_device = jaxspeed.train(config, split)
  config.zero.offload_optimizer, config.steps = "host", 4
  jaxspeed.train(config, split)
  config.zero.offload_optimizer, config.steps = "none", 6
  jaxspeed.train(config, split)

  expected, resumed = _losses(straight), _losses(split)
  assert sorted(resumed) == list(range(1, 7))
  np.testing.assert_allclose([resumed[s] for s in range(1, 7)],
                             [expected[s] for s in range(1, 7)], rtol=1e-6)
  # The summary's accounting: offloading moves bytes from device to host memory.
  assert offloaded["offload_optimizer"] == "host" and on_device["offload_optimizer"] == "none"
  assert on_device["state_host_bytes_per_device"] == 0
  assert offloaded["state_host_bytes_per_device"] > 0
  assert (offloaded["state_device_bytes_per_device"] + offloaded["state_host_bytes_per_device"]
          == on_device["state_device_bytes_per_device"])


@pytest.mark.parametrize("overrides", [{"offload_optimizer": "cpu"},
                                       {"offload_optimizer": "nvme"}])
def test_bad_offload_value_names_the_key(overrides, tiny_config):
  tiny_config.zero.update(overrides)
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == "zero.offload_optimizer"
  assert "allowed values: none, host" in str(info.value)


def test_rlhf_rejects_offload_before_compiling(tiny_config):
  from jaxspeed.config import validate_rlhf

  tiny_config.zero.offload_optimizer = "host"
  with pytest.raises(jaxspeed.ConfigError) as info:
    validate_rlhf(tiny_config, 8)
  assert info.value.key == "zero.offload_optimizer"
  assert "allowed: none" in str(info.value)


def test_guard_skips_a_step_whose_host_state_is_not_finite(tiny_config, monkeypatch):
  """The optimizer state checked on the host: a NaN there skips the step (finite update)."""
  from jaxspeed.training import trainer

  make = trainer.make_optimizer

  def poisoned(*args, **kwargs):
    nan_state = optax.GradientTransformation(
        lambda params: jnp.zeros((), jnp.float32),
        lambda updates, state, params=None: (updates, state + jnp.nan))
    return optax.chain(make(*args, **kwargs), nan_state)

  monkeypatch.setattr(trainer, "make_optimizer", poisoned)
  _, setup, state = train_losses(_configure(tiny_config, "adamw", 1, "host"), 2)
  assert setup.specs.host_update
  assert int(state.skipped) == 2
  assert int(state.opt_state[0][0].count) == 0  # AdamW's state kept as it was
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)} == {"pinned_host"}


def test_master_weights_keep_updates_that_bfloat16_rounds_away():
  """bfloat16 has 8 significant bits: 1 + 2**-10 rounds to 1, so ten such updates are lost
  on bfloat16 parameters and kept by the float32 master (1 + 10 * 2**-10 = 1.009765625,
  whose bfloat16 rounding is 1 + 2**-7 = 1.0078125)."""
  from jaxspeed.optimizers import apply_updates, round_params, with_master_weights

  optimizer = with_master_weights(optax.sgd(1.0), jnp.bfloat16)
  params = {"w": jnp.ones(3, jnp.float32)}
  opt_state = optimizer.init(params)
  params = round_params(params, opt_state)
  plain = params
  for _ in range(10):
    updates, opt_state = optimizer.update({"w": jnp.full(3, -2.0**-10, jnp.bfloat16)}, opt_state,
                                          params)
    params, opt_state = apply_updates(params, updates, opt_state, jnp.float32(1.0))
    plain, _ = apply_updates(plain, {"w": jnp.full(3, 2.0**-10, jnp.bfloat16)}, None, 1.0)
  assert params["w"].dtype == jnp.bfloat16 and opt_state.master["w"].dtype == jnp.float32
  np.testing.assert_array_equal(opt_state.master["w"], np.float32(1.009765625))
  np.testing.assert_array_equal(params["w"], jnp.bfloat16(1.0078125))
  np.testing.assert_array_equal(plain["w"], jnp.bfloat16(1.0))


def test_bfloat16_parameters_with_master_weights_on_the_host(tiny_config, tmp_path):
  """ZeRO-Offload's precision setting: bfloat16 parameters on device, the float32 master
  and the AdamW moments on the host, updated there, with activation offload; the same
  run as all on device."""
  def configure(offload: str):
    config = _configure(tiny_config, "adamw", 3, offload)
    config.model.update(param_dtype="bfloat16", dtype="bfloat16")
    config.microbatches = 2  # float32 sums of bfloat16 gradients
    config.steps, config.eval_every, config.checkpoint_every, config.log_every = 3, 3, 3, 1
    return config

  expected, _, reference = train_losses(configure("none"), 3)
  workdir = str(tmp_path / "run")
  offloaded = configure("host")
  offloaded.model.remat = "offload"  # and the matmul outputs saved on the host
  summary = jaxspeed.train(offloaded, workdir)
  losses = [r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in r]
  np.testing.assert_allclose(losses, expected, rtol=1e-5)

  # Per parameter, the device holds 2 bytes (bfloat16); the host 12 (float32 master and
  # the two moments, in the same ZeRO-3 slices), besides a few scalars.
  assert {x.dtype for x in jax.tree.leaves(reference.params)} == {jnp.dtype(jnp.bfloat16)}
  assert summary["param_dtype"] == "bfloat16"
  params_bytes = bytes_per_device(reference.params)["device"]
  assert summary["state_device_bytes_per_device"] - params_bytes < 64
  assert 0 <= summary["state_host_bytes_per_device"] - 6 * params_bytes < 64

  # Fine-tuning from this run starts from its float32 master, not the rounded parameters.
  from jaxspeed.checkpoint import load_params

  with jax.set_mesh(reference.step.sharding.mesh):
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                                         sharding=x.sharding),
                          reference.params)
    params, step = load_params(workdir, target)
  assert step == 3
  # (The offloaded run recomputes what it does not save: a few roundings differ.)
  master = jax.tree.map(np.asarray, reference.opt_state.master)
  assert_trees_close(params, master, rtol=1e-4, atol=5e-6)
  kernel = np.asarray(params["layer_0"]["mlp"]["wi"])
  assert np.any(kernel != kernel.astype(jnp.bfloat16).astype(np.float32))


def test_speculative_update_equals_the_validated_one(tiny_config):
  """SuperOffload's speculation: the host update from the unclipped gradient is kept when
  clipping does not apply and redone when it does; the run equals the plain one exactly."""
  config = _configure(tiny_config, "adamw", 1, "host")
  config.optim.grad_clip = 2.5  # the first step's gradient norm is above, the rest below
  expected, _, reference = train_metrics(config, 3)
  config.zero.offload_speculation = True
  history, _, state = train_metrics(config, 3)

  norms = [float(m["grad_norm"]) for m in expected]
  assert norms[0] > 2.5 > max(norms[1:])
  assert [int(m["speculation_redone"]) for m in history] == [1, 0, 0]
  assert [float(m["loss"]) for m in history] == [float(m["loss"]) for m in expected]
  assert_trees_close(state.params, reference.params, atol=0, rtol=0)
  assert_trees_close(state.opt_state, reference.opt_state, atol=0, rtol=0)


def test_speculative_update_is_rolled_back_when_not_finite(tiny_config, monkeypatch):
  """A speculative host update that is not finite leaves parameters and optimizer state
  exactly as they were (the step is counted as skipped)."""
  from jaxspeed.training import trainer

  make = trainer.make_optimizer

  def poisoned(*args, **kwargs):  # NaN updates from the second step on
    def update(updates, count, params=None):
      return jax.tree.map(lambda u: u + jnp.where(count >= 1, jnp.nan, 0.0), updates), count + 1
    return optax.chain(make(*args, **kwargs), optax.GradientTransformation(
        lambda params: jnp.zeros((), jnp.int32), update))

  monkeypatch.setattr(trainer, "make_optimizer", poisoned)
  config = _configure(tiny_config, "adamw", 1, "host")
  config.zero.offload_speculation = True
  _, _, after_one = train_metrics(config, 1)
  history, _, state = train_metrics(config, 3)
  assert [int(m["skipped_steps"]) for m in history] == [0, 1, 2]
  assert_trees_close(state.params, after_one.params, atol=0, rtol=0)
  assert_trees_close(state.opt_state, after_one.opt_state, atol=0, rtol=0)


def test_speculation_needs_the_update_on_the_host(tiny_config):
  tiny_config.zero.offload_speculation = True
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == "zero.offload_speculation"
  assert "zero.offload_optimizer=host" in str(info.value)


def test_parameter_offload_matches_and_resumes_with_a_sample(tiny_config, tmp_path):
  """ZeRO-Infinity: the blocks' parameters in host memory (with the optimizer state and
  full remat) train as the run kept on device, checkpoint, resume and sample."""
  config = _configure(tiny_config, "adamw", 3, "none")
  config.log_every, config.checkpoint_every, config.eval_every = 1, 2, 4
  config.optim.decay = 4
  config.steps = 4
  jaxspeed.train(config, str(tmp_path / "device"))

  config.zero.update(offload_params="host", offload_optimizer="host")
  config.model.remat = "full"
  config.steps = 2
  jaxspeed.train(config, str(tmp_path / "host"))
  config.steps, config.sample_tokens = 4, 4
  summary = jaxspeed.train(config, str(tmp_path / "host"))

  expected, resumed = _losses(tmp_path / "device"), _losses(tmp_path / "host")
  np.testing.assert_allclose([resumed[s] for s in range(1, 5)],
                             [expected[s] for s in range(1, 5)], rtol=1e-6)
  assert summary["offload_params"] == "host" and len(summary["sample"]) > 0
  # Only the scalars and the parameters outside the blocks (embeddings, final LayerNorm)
  # stay in device memory.
  setup = jaxspeed.build(config)
  state = setup.abstract_state()
  outside = {k: v for k, v in state.params.items() if not k.startswith("layer_")}
  assert summary["state_device_bytes_per_device"] == bytes_per_device(
      state.replace(params=outside, opt_state=()))["device"]
  kinds = {k: {x.sharding.memory_kind for x in jax.tree.leaves(v)}
           for k, v in state.params.items()}
  assert kinds.pop("layer_0") == {"pinned_host"} and set().union(*kinds.values()) == {"device"}


def test_parameter_offload_needs_zero3(tiny_config):
  tiny_config.zero.update(stage=1, offload_params="host")
  with pytest.raises(jaxspeed.ConfigError) as info:
    jaxspeed.build(tiny_config)
  assert info.value.key == "zero.offload_params"
  assert "needs zero.stage=3" in str(info.value)


def test_offload_runs_in_a_pipeline(tiny_config):
  """The optimizer state on the host with pipeline stages (pp2 x dp2 x tp2, ZeRO-1): the
  same run as in device memory."""
  def configure(offload: str):
    config = _configure(tiny_config, "adamw", 1, offload)
    config.parallel.update(stage=2, fsdp=1)
    config.model.num_layers = 2
    config.microbatches = 2
    return config

  expected, _, _ = train_losses(configure("none"), 3)
  losses, setup, state = train_losses(configure("host"), 3)
  np.testing.assert_allclose(losses, expected, rtol=1e-5)
  assert setup.mesh.shape["stage"] == 2 and setup.specs.host_update
  assert {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)} == {"pinned_host"}


def _host_copies_inside_backward(setup) -> int:
  """Copies to host memory the step's program makes between its first and last matmul."""
  step = setup.train_step.for_kind(setup.train_step.kind_at(0))
  with jax.set_mesh(setup.mesh):
    lines = str(jax.make_jaxpr(step)(setup.abstract_state(),
                                     setup.to_device(setup.train_data.batch_at(0)))).splitlines()
  matmuls = [i for i, line in enumerate(lines) if "dot_general[" in line]
  return sum(matmuls[0] < i < matmuls[-1] for i, line in enumerate(lines)
             if "= device_put[" in line and "<host>" in line)


def test_gradients_stream_to_the_host_during_the_backward_pass(tiny_config):
  """ZeRO-Offload's gradient streaming: with the update on the host, each block's gradient
  is copied to host memory as soon as the backward pass has it. With two layers the
  second layer's gradient goes out before the first layer's backward matmuls; nothing
  does without offload, or for the 1-bit family, which updates on device. (Read from the
  program: XLA:CPU lowers in-program memory copies as no-ops.)"""
  config = _configure(tiny_config, "adamw", 1, "host")
  config.model.num_layers = 2
  setup = jaxspeed.build(config)
  assert setup.specs.stream_gradients
  assert _host_copies_inside_backward(setup) == 1
  config.optim.name = "onebit_adam"
  assert _host_copies_inside_backward(jaxspeed.build(config)) == 0
  config.update_from_flattened_dict({"optim.name": "adamw", "zero.offload_optimizer": "none"})
  assert _host_copies_inside_backward(jaxspeed.build(config)) == 0


def test_lamb_equals_optax_lamb():
  """The LAMB that can update on the host computes optax's LAMB."""
  from jaxspeed.training.optim import decay_mask, lamb

  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), "bias": jnp.zeros(16)}
  ours = lamb(b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01)
  ref = optax.lamb(1.0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, mask=decay_mask)
  state, ref_state = ours.init(params), ref.init(params)
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, state = ours.update(grads, state, params)
    expected, ref_state = ref.update(grads, ref_state, params)
    assert_trees_close(updates, expected, rtol=1e-6, atol=1e-7)
    params = optax.apply_updates(params, jax.tree.map(lambda u: 0.01 * u, updates))
