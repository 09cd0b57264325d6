"""A checkpoint resumes under another layout: pipeline on/off, ZeRO stage, tensor, experts,
and 1-bit worker counts (``jaxspeed.checkpoint.layout``)."""

import jax
import numpy as np
import pytest
from helpers import assert_trees_close

import jaxspeed
from jaxspeed.checkpoint import Checkpointer
from jaxspeed.checkpoint.layout import LayoutError, convert, unstack


def _config(config, parallel: dict, zero_stage: int = 0):
  config.model.update(num_layers=2, num_heads=2, d_model=32, d_ff=64)
  config.optim.decay = 100  # the schedule must not depend on where the run stops
  config.parallel.update({"data": 1, "fsdp": 1, "tensor": 1, **parallel})
  config.zero.stage = zero_stage
  return config


def _train(setup, state, first: int, last: int) -> tuple[list[float], object]:
  losses = []
  for step in range(first, last):
    state, metrics = setup.train_step(state, setup.to_device(setup.train_data.next_batch()), step)
    losses.append(float(metrics["loss"]))
  return losses, state


def _resume_on_other_layout(config, tmp_path, parallel_b: dict, zero_b: int):
  """Trains 4 steps on layout A, saving step 2; resumes that checkpoint on layout B to step 4.

  Returns:
    (A's losses of steps 3-4, B's losses of steps 3-4, the Setup of B).
  """
  setup = jaxspeed.build(config)
  checkpointer = Checkpointer(str(tmp_path))
  with jax.set_mesh(setup.mesh):
    _, state = _train(setup, setup.init_state(), 0, 2)
    checkpointer.save(2, state, setup.train_data.state)
    checkpointer.close()
    expected, _ = _train(setup, state, 2, 4)
  config.parallel.update({"data": 1, "fsdp": 1, "tensor": 1, "stage": 1, "expert": 1,
                          **parallel_b})
  config.zero.stage = zero_b
  setup = jaxspeed.build(config)
  checkpointer = Checkpointer(str(tmp_path))
  with jax.set_mesh(setup.mesh):
    state, data_state = checkpointer.restore(2, setup.abstract_state())
    checkpointer.close()
    setup.train_data.restore(data_state)
    resumed, _ = _train(setup, state, 2, 4)
  return expected, resumed, setup


@pytest.mark.parametrize("parallel_a,zero_a,parallel_b,zero_b", [
    ({"stage": 2, "data": 4}, 1, {"data": 8}, 0),  # pipeline -> none
    ({"data": 4, "tensor": 2}, 3, {"data": 8}, 1),  # ZeRO-3 tensor=2 -> ZeRO-1 data only
], ids=["pipeline_off", "zero3_tp2_to_zero1"])
def test_resume_under_another_layout_continues_the_same_losses(tiny_config, tmp_path, parallel_a,
                                                                zero_a, parallel_b, zero_b):
  config = _config(tiny_config, parallel_a, zero_a)
  config.microbatches = 2
  expected, resumed, _ = _resume_on_other_layout(config, tmp_path, parallel_b, zero_b)
  np.testing.assert_allclose(resumed, expected, rtol=1e-4)


def test_expert_moments_follow_their_experts(tiny_config, tmp_path):
  config = _config(tiny_config, {"expert": 4, "data": 2})
  config.model.num_layers = 1
  config.moe.update(num_experts=8, top_k=1, expert_interval=1)
  config.moe.drop_tokens = False
  expected, resumed, setup = _resume_on_other_layout(config, tmp_path,
                                                     {"expert": 2, "data": 4}, 0)
  np.testing.assert_allclose(resumed, expected, rtol=1e-4)
  # Each expert's Adam moments, saved under expert=4, are restored to the same expert.
  checkpointer = Checkpointer(str(tmp_path))
  with jax.set_mesh(setup.mesh):
    restored, _ = checkpointer.restore(2, setup.abstract_state())
  saved = checkpointer.restore(2, jax.tree.map(lambda x: np.empty(x.shape, x.dtype),
                                               setup.abstract_state()))[0]
  checkpointer.close()
  mu, saved_mu = (s.opt_state[0].mu["layer_0"]["moe"]["wi"] for s in (restored, saved))
  assert "expert" in str(mu.sharding.spec[0])
  np.testing.assert_array_equal(np.asarray(mu), saved_mu)
  assert len({float(np.abs(saved_mu[e]).sum()) for e in range(8)}) == 8  # all distinct


def test_onebit_adam_resumes_on_half_the_workers(tiny_config, tmp_path):
  """8 -> 4 workers (and tensor=2) in the compression phase: error feedback reset; training
  goes on."""
  config = _config(tiny_config, {"data": 8})
  config.model.num_layers = 1
  # A low rate: 1-bit Adam after a 2-step warm-up diverges at the default one.
  config.optim.update(name="onebit_adam", freeze_step=2, learning_rate=1e-4)
  expected, resumed, _ = _resume_on_other_layout(config, tmp_path, {"data": 4, "tensor": 2}, 0)
  assert np.all(np.isfinite(resumed))
  np.testing.assert_allclose(resumed, expected, rtol=0.01)


def test_zero_one_adam_state_on_half_the_workers(tiny_config, tmp_path):
  """Per-worker momenta [8, ...] -> their mean for each of 4 workers; errors reset (the
  tensor-parallel blocks change)."""
  config = _config(tiny_config, {"data": 8})
  config.optim.update(name="zero_one_adam", var_freeze_step=1)
  setup = jaxspeed.build(config)
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
  mu = state.opt_state.mu["embed"]["table"]
  rows = np.arange(8, dtype=np.float32).reshape(8, 1, 1) * np.ones(mu.shape[1:], np.float32)
  errors = [e._replace(worker=np.ones(e.worker.shape, np.float32)) for e in
            state.opt_state.errors]
  state = state.replace(opt_state=state.opt_state._replace(
      mu={**state.opt_state.mu, "embed": {"table": rows}}, errors=tuple(errors)))
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(1, state, {})
  checkpointer.close()
  config.parallel.update(data=4, tensor=2)
  setup = jaxspeed.build(config)
  checkpointer = Checkpointer(str(tmp_path))
  with jax.set_mesh(setup.mesh):
    restored, _ = checkpointer.restore(1, setup.abstract_state())
  checkpointer.close()
  assert restored.opt_state.mu["embed"]["table"].shape == (4, *mu.shape[1:])
  np.testing.assert_array_equal(np.asarray(restored.opt_state.mu["embed"]["table"]), 3.5)
  assert all(not np.any(np.asarray(e.worker)) for e in restored.opt_state.errors)
  assert_trees_close(restored.params, state.params, rtol=0)


def _leaves(p: int, per_stage: int, workers: int | None = None):
  """A params/momentum pair of a 2-layer model stacked as [p, L/p, 3] (with [P] momenta)."""
  layers = np.arange(6, dtype=np.float32).reshape(2, 3)
  param = layers.reshape(p, per_stage, 3)
  mu = param if workers is None else np.stack([param + w for w in range(workers)])
  return {("params", "layers", "w"): param, ("opt_state", "mu", "layers", "w"): mu,
          ("params", "embed"): np.ones(4, np.float32)}


def test_convert_restacks_pipeline_layers_and_their_moments():
  saved = _leaves(2, 1, workers=2)
  assert np.array_equal(unstack(saved)[("opt_state", "mu", "layer_1", "w")],
                        [[3, 4, 5], [4, 5, 6]])
  target = {k: np.empty_like(v) for k, v in _leaves(1, 2, workers=4).items()}
  out = convert(saved, target)
  assert np.array_equal(out[("params", "layers", "w")], saved[("params", "layers", "w")]
                        .reshape(1, 2, 3))
  # Per-worker momenta: the mean over the 2 saved workers, for each of the 4 new ones.
  assert np.array_equal(out[("opt_state", "mu", "layers", "w")],
                        np.broadcast_to(saved[("params", "layers", "w")].reshape(1, 2, 3) + 0.5,
                                        (4, 1, 2, 3)))


def _errors(workers: int, blocks: int, size: int, worker, server):
  """Error buffers of ``workers`` x ``blocks`` devices: worker [rows, size], server
  [rows, size / workers]; row ``w * blocks + t`` filled by ``worker(w, t)``/``server(w, t)``."""
  rows = [(w, t) for w in range(workers) for t in range(blocks)]
  chunk = size // workers
  return {("opt_state", "errors", "0", "worker"):
          np.stack([np.broadcast_to(np.float32(worker(w, t)), (size,)) for w, t in rows]),
          ("opt_state", "errors", "0", "server"):
          np.stack([np.asarray(server(w, t), np.float32).reshape(chunk) for w, t in rows])}


def test_convert_resplits_error_feedback_for_another_worker_count():
  """4 -> 2 workers, 2 tensor-parallel blocks: the pending correction is kept."""
  chunk = np.arange(3, dtype=np.float32)
  saved = _errors(4, 2, 12, worker=lambda w, t: 10 * w + t,
                  server=lambda w, t: 100 * t + 3 * w + chunk)
  target = {k: np.empty_like(v) for k, v in _errors(2, 2, 16, lambda w, t: 0,
                                                    lambda w, t: np.zeros(8)).items()}
  out = convert(saved, target)
  worker = out[("opt_state", "errors", "0", "worker")]
  # Each new worker holds the mean of the 4 saved workers' errors for its block (15 + t),
  # and zeros where the new padding is longer.
  for w in range(2):
    for t in range(2):
      np.testing.assert_array_equal(worker[2 * w + t], [15 + t] * 12 + [0] * 4)
  server = out[("opt_state", "errors", "0", "server")]
  # Block t's server vector 100 t + [0 .. 11], cut into 2 chunks of 8 (zero-padded).
  full = lambda t: np.concatenate([100 * t + np.arange(12), np.zeros(4)])
  for w in range(2):
    for t in range(2):
      np.testing.assert_array_equal(server[2 * w + t], full(t)[8 * w:8 * w + 8])


def test_convert_resets_error_feedback_when_the_tensor_blocks_change():
  saved = _errors(4, 2, 12, lambda w, t: 1, lambda w, t: np.ones(3))
  target = {k: np.empty_like(v) for k, v in _errors(8, 1, 16, lambda w, t: 0,
                                                    lambda w, t: np.zeros(2)).items()}
  out = convert(saved, target)
  assert all(not np.any(v) for v in out.values())


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop(("params", "embed")), "the checkpoint has params/embed, which this config"),
    (lambda t: t.update({("params", "head"): np.ones(2, np.float32)}), "has no params/head"),
    (lambda t: t.update({("params", "embed"): np.ones(5, np.float32)}),
     r"params/embed has shape \(4,\) in the checkpoint, \(5,\) here"),
    (lambda t: t.update({("params", "embed"): np.ones(4, np.float64)}),
     "params/embed is float32 in the checkpoint, float64 here"),
], ids=["extra", "missing", "shape", "dtype"])
def test_convert_names_the_leaf_of_another_model(change, message):
  saved = _leaves(2, 1)
  target = dict(saved)
  change(target)
  with pytest.raises(LayoutError, match=message):
    convert(saved, target)


def test_convert_moves_layers_between_the_interleaved_and_the_plain_stacking():
  """Interleaved [p=2, v=2, 1] holds chunk r·p + s at [s, r]: layer ℓ's value is ℓ."""
  layer = lambda i: np.full(3, i, np.float32)
  circular = np.stack([np.stack([layer(0), layer(2)]), np.stack([layer(1), layer(3)])])[:, :, None]
  saved = {("params", "circular_layers", "w"): circular}
  assert [float(unstack(saved)[("params", f"layer_{i}", "w")][0]) for i in range(4)] == [0, 1, 2, 3]
  plain = convert(saved, {("params", "layers", "w"): np.empty((2, 2, 3), np.float32)})
  assert np.array_equal(plain[("params", "layers", "w")][:, :, 0], [[0, 1], [2, 3]])
  back = convert(plain, {("params", "circular_layers", "w"): np.empty((2, 2, 1, 3), np.float32)})
  assert np.array_equal(back[("params", "circular_layers", "w")], circular)
