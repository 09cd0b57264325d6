"""GPipe pipeline parallelism: same losses as one device, real ppermutes, clear config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, train_losses, train_metrics

from jaxspeed.comm.hlo import collectives
from jaxspeed.config import validate
from jaxspeed.errors import ConfigError
from jaxspeed.models import GPT, ModelConfig, PipelinedGPT
from jaxspeed.parallel import compute_rules, make_mesh
from jaxspeed.parallel.mesh import spec_axes
from jaxspeed.parallel.pipeline import (
  SCHEDULES,
  bubble_fraction,
  circular,
  from_microbatches,
  gpipe,
  run_stages_sequentially,
  stack_layers,
  stacked_key,
  to_microbatches,
  unstack_layers,
)

LAYOUTS = {  # parallel axes, ZeRO settings, microbatches
    "pp2_dp4_zero1": ({"stage": 2, "data": 4}, {"stage": 1}, 4),
    "pp4_dp2_zero2_reduce_scatter": ({"stage": 4, "data": 2}, {"stage": 2, "reduce_scatter": True},
                                     8),
    "pp2_tp2_dp2_zero3": ({"stage": 2, "tensor": 2, "data": 2}, {"stage": 3}, 2),
    # Ulysses inside the stages: each stage runs on its sequence shards.
    "pp2_sp2_dp2_zero1": ({"stage": 2, "sequence": 2, "data": 2}, {"stage": 1}, 2),
}


def _pipeline_config(config):
  """4 layers, d_model 32: small enough for three pipelined layouts in a few seconds each."""
  config.model.update(num_layers=4, d_model=32, d_ff=64)
  config.seq_len = config.model.max_seq_len = 16
  return config


@pytest.fixture(scope="module")
def reference_losses():
  """One-device losses by layer count (the interleaved schedule on 4 stages needs 8 layers)."""
  from conftest import tiny_config

  cache = {}

  def losses(num_layers: int):
    if num_layers not in cache:
      config = _pipeline_config(tiny_config.__wrapped__())
      config.model.num_layers = num_layers
      cache[num_layers] = train_losses(config, 10, devices=jax.devices()[:1])[0]
    return cache[num_layers]
  return losses


# Every schedule on the two-stage layouts; four stages and Ulysses inside the stages with 1F1B
# only: its in-flight ring depends on p most, the schedules share the stage map, and each case
# costs seconds.
CASES = [(layout, schedule) for layout in sorted(LAYOUTS) for schedule in SCHEDULES
         if (layout.startswith("pp2_") and "sp2" not in layout) or schedule == "1f1b"]


@pytest.mark.parametrize("layout,schedule", CASES)
def test_pipeline_matches_single_device(layout, schedule, tiny_config, reference_losses):
  parallel, zero, microbatches = LAYOUTS[layout]
  config = _pipeline_config(tiny_config)
  config.pipeline.schedule = schedule
  interleaved = schedule == "interleaved"
  virtual = config.pipeline.virtual_stages if interleaved else 1
  config.model.num_layers = max(4, parallel["stage"] * virtual)
  config.parallel.data = 1
  config.parallel.update(parallel)
  config.zero.update(zero)
  # The interleaved schedule runs v·m + p − 1 unrolled iterations: half the microbatches
  # (still a multiple of p) keep its compile time near the others'.
  config.microbatches = max(parallel["stage"], microbatches // 2) if interleaved else microbatches
  losses, setup, state = train_losses(config, 10)
  assert isinstance(setup.model, PipelinedGPT)
  # Each stage's devices hold only that stage's layers (v chunks of them if interleaved).
  layers = config.model.num_layers
  wi = state.params[stacked_key(virtual)]["mlp"]["wi"]
  stacked = (parallel["stage"], virtual, layers // parallel["stage"] // virtual)
  assert wi.shape[:3 if interleaved else 2] == (stacked if interleaved else stacked[::2])
  assert wi.sharding.spec[0] == "stage"
  # ZeRO-3 also splits each stage's parameters over its data-parallel devices.
  split_over_data = any("data" in spec_axes(e) for e in wi.sharding.spec)
  assert split_over_data == (zero["stage"] == 3)
  np.testing.assert_allclose(losses, reference_losses(layers), rtol=1e-4)
  assert losses[-1] < losses[0]
  if layout == "pp2_dp4_zero1" and schedule == "gpipe":
    _assert_microbatches_are_permuted(setup, state, rows=16 // 4 // microbatches)


# With 1F1B only, whose own backward pass carries the aux term's gradient; GPipe and the
# interleaved schedule differentiate the same statistics by autodiff (equal in manual runs).
@pytest.mark.parametrize("schedule", ["1f1b"])
def test_moe_layers_in_stages_match_single_device(schedule, tiny_config):
  """MoE layers inside the stages (every layer: the stages stack alike layers), dropless
  top-1 with the aux loss at weight 1, so that its gradient shows: losses, aux loss and
  expert loads equal one device accumulating the same 4 microbatches. With 1F1B the aux
  term's gradient flows back through the schedule's own backward pass."""
  config = _pipeline_config(tiny_config)
  config.moe.update(num_experts=4, top_k=1, drop_tokens=False, expert_interval=1,
                    aux_loss_coef=1.0)
  config.microbatches = 4
  reference, _, _ = train_metrics(config, 3, devices=jax.devices()[:1])
  config.parallel.update(data=4, stage=2)
  config.pipeline.schedule = schedule
  history, setup, _ = train_metrics(config, 3)
  assert isinstance(setup.model, PipelinedGPT)
  for key in ("loss", "moe_aux_loss", "moe_expert_tokens", "grad_norm"):
    np.testing.assert_allclose([np.asarray(m[key]) for m in history],
                               [np.asarray(m[key]) for m in reference], rtol=2e-5, err_msg=key)
  assert float(history[0]["moe_aux_loss"]) > 0


def test_dropout_in_a_pipeline_draws_per_microbatch_stage_and_layer(tiny_config):
  """Dropout runs inside the stages: the run is reproducible and differs from the run
  without dropout (its masks are drawn per microbatch, stage and layer)."""
  config = _pipeline_config(tiny_config)
  config.parallel.update(data=4, fsdp=1, stage=2)
  config.microbatches = 2
  without, _, _ = train_losses(config, 3)
  config.model.dropout = 0.1
  first, _, _ = train_losses(config, 3)
  second, _, _ = train_losses(config, 3)
  assert first == second and first != without
  assert all(np.isfinite(first))


def _assert_microbatches_are_permuted(setup, state, rows: int):
  """The compiled step sends microbatch activations [rows, S, d_model] with collective-permutes:
  the forward sends and their transposes in the backward pass. The schedule is unrolled: no
  while loop, whose backward residual buffers XLA zero-filled and copied every step."""
  with jax.set_mesh(setup.mesh):
    batch = setup.to_device(setup.train_data.batch_at(0))
    hlo = setup.train_step.lower(state, batch).compile().as_text()
  permutes = [c for c in collectives(hlo, 8) if c.op == "collective-permute"]
  iterations = 4 + 2 - 1
  assert len(permutes) == 2 * (iterations - 1)  # each iteration but the last sends, and back
  assert max(c.result_bytes for c in permutes) == rows * 16 * 32 * 4  # float32
  # (The suite's XLA:CPU flags lower a scatter-add, the embedding's gradient, as a loop.)
  assert not [line for line in hlo.splitlines() if " while(" in line and "scatter" not in line]


def _tiny_model_config(**overrides):
  return ModelConfig(**{**dict(num_layers=4, d_model=32, num_heads=4, d_ff=64, max_seq_len=16),
                        **overrides})


@pytest.fixture(scope="module")
def alibi_model():
  """(config, boxed plain GPT params) with ALiBi and an untied head.

  Random numpy values in the init's boxes: compiling the init's random number
  generation costs XLA:CPU seconds, and any values serve an equality test.
  """
  cfg = _tiny_model_config(position="alibi", tie_embeddings=False)
  abstract = jax.eval_shape(GPT(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
  rng = np.random.default_rng(0)
  return cfg, jax.tree.map(
      lambda box: box.replace(value=0.1 * rng.standard_normal(box.value.shape, np.float32)),
      abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def test_stack_layers_layout_and_round_trip(alibi_model):
  cfg, plain = alibi_model
  plain = plain["params"]
  stacked = stack_layers(plain, 4, 2)
  # Stage 1, slot 0 is layer 2; boxes carry the logical names of the stacked dimensions.
  np.testing.assert_array_equal(stacked["layers"]["mlp"]["wi"].value[1, 0],
                                plain["layer_2"]["mlp"]["wi"].value)
  assert stacked["layers"]["mlp"]["wi"].names == ("stage", "layers", "embed", "mlp")
  # PipelinedGPT.init has exactly this layout (its values are GPT.init's, so the
  # first losses of the layout tests above equal the single-device ones).
  abstract = jax.eval_shape(PipelinedGPT(cfg, num_stages=2).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 16), jnp.int32))["params"]
  shapes = lambda tree: jax.tree.map(lambda x: (x.value.shape, x.names), tree,
                                     is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert shapes(abstract) == shapes(stacked)
  unboxed = nn.meta.unbox(plain)
  assert_trees_close(unstack_layers(stack_layers(unboxed, 4, 2)), unboxed, rtol=0)
  with pytest.raises(ValueError, match="do not split evenly"):
    stack_layers(unboxed, 4, 3)


def test_pipelined_logits_and_grads_equal_plain(alibi_model):
  """On a 2-stage x 2-data x 2-tensor mesh, with ALiBi (positions inside the stages) and an
  untied LM head: a loss of the logits and its gradients equal the plain GPT's."""
  cfg, plain = alibi_model
  plain = nn.meta.unbox(plain)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 16), 0, cfg.vocab_size)
  model = PipelinedGPT(cfg, num_stages=2, microbatches=4)
  piped = {"params": stack_layers(plain["params"], 4, 2)}
  loss_and_grads = lambda m: jax.jit(jax.value_and_grad(
      lambda v: jnp.mean(jnp.sin(m.apply(v, tokens)))))
  ref_loss, ref_grads = loss_and_grads(GPT(cfg))(plain)
  with jax.set_mesh(make_mesh({"stage": 2, "data": 2, "tensor": 2})), \
      nn.logical_axis_rules(compute_rules()):
    loss, grads = loss_and_grads(model)(piped)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_trees_close(unstack_layers(grads["params"]), ref_grads["params"], atol=1e-6, rtol=0)


def test_gpipe_against_sequential_reference():
  """Stages x -> x·w_s + s on 4 stages, 8 microbatches: the schedule only reorders work."""
  stage_fn = lambda w, x, extra, stage: x @ w[0] + extra[:, None] + stage
  weights = jax.random.normal(jax.random.PRNGKey(0), (4, 1, 3, 3))
  inputs = jax.random.normal(jax.random.PRNGKey(1), (8, 2, 3))
  extras = jnp.arange(16.0).reshape(8, 2)
  expected = run_stages_sequentially(stage_fn, weights, inputs, extras)
  by_hand = inputs
  for s in range(4):  # each stage also adds its index
    by_hand = by_hand @ weights[s, 0] + extras[:, :, None] + s
  np.testing.assert_allclose(expected, by_hand, rtol=1e-5)
  with jax.set_mesh(make_mesh({"stage": 4, "data": 2})):
    out = jax.jit(gpipe, static_argnums=0)(stage_fn, weights, inputs, extras)
  np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_circular_against_sequential_reference():
  """4 stages x 2 chunks of one layer each, 8 microbatches: the same result and gradients as
  the 8 layers one after another (chunk r·p + s on stage s)."""
  stage_fn = lambda w, x, extra, chunk: jnp.tanh(x @ w[0] + extra[:, None] + chunk)
  weights = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 3))
  inputs = jax.random.normal(jax.random.PRNGKey(1), (8, 2, 3))
  extras = jnp.arange(16.0).reshape(8, 2)
  stacked = jnp.swapaxes(weights.reshape(2, 4, 1, 3, 3), 0, 1)  # [p, v, L/(p·v), ...]
  assert np.array_equal(stacked[1, 1, 0], weights[5])  # chunk 1·4 + 1
  sequential = lambda w, x: run_stages_sequentially(stage_fn, w[:, None], x, extras)
  expected = sequential(weights, inputs)
  expected_grad = jax.grad(lambda w: jnp.sum(sequential(w, inputs) ** 2))(weights)
  run = lambda w: circular(stage_fn, w, inputs, extras)
  with jax.set_mesh(make_mesh({"stage": 4, "data": 2})):
    out = jax.jit(run)(stacked)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(run(w) ** 2)))(stacked)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.swapaxes(grad, 0, 1).reshape(8, 3, 3), expected_grad,
                             rtol=1e-5, atol=1e-6)


def test_interleaved_stacking_round_trip(alibi_model):
  cfg, plain = alibi_model
  stacked = stack_layers(plain["params"], 4, 2, virtual_stages=2)
  wi = stacked["circular_layers"]["mlp"]["wi"]
  assert wi.names == ("stage", "virtual", "layers", "embed", "mlp")
  assert wi.value.shape[:3] == (2, 2, 1)
  # Stage 1's second chunk is chunk 1·2 + 1 = layer 3.
  np.testing.assert_array_equal(wi.value[1, 1, 0], plain["params"]["layer_3"]["mlp"]["wi"].value)
  abstract = jax.eval_shape(PipelinedGPT(cfg, num_stages=2, virtual_stages=2).init,
                            jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
  assert jax.tree.structure(abstract) == jax.tree.structure(stacked)
  unboxed = nn.meta.unbox(plain["params"])
  assert_trees_close(unstack_layers(stack_layers(unboxed, 4, 2, 2)), unboxed, rtol=0)


def test_microbatch_split_round_trip():
  x = jnp.arange(24).reshape(12, 2)
  micro = to_microbatches(x, 3)
  assert micro.shape == (3, 4, 2)
  np.testing.assert_array_equal(micro[1, :, 0], [2, 8, 14, 20])  # rows 1, 4, 7, 10
  np.testing.assert_array_equal(from_microbatches(micro), x)


def test_bubble_fraction():
  assert bubble_fraction(4, 8, virtual_stages=2) == pytest.approx(3 / 19)
  assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
  assert bubble_fraction(2, 8) == pytest.approx(1 / 9)
  assert bubble_fraction(1, 5) == 0


@pytest.mark.parametrize("overrides,key,match", [
    ({"parallel.stage": 8, "model.num_layers": 4}, "parallel.stage", "exceed model.num_layers"),
    ({"parallel.stage": 4, "model.num_layers": 6}, "parallel.stage", "split evenly"),
    ({"parallel.stage": 2, "microbatches": 3}, "batch_size", "microbatches"),
    ({"parallel.stage": 2, "model.name": "bert"}, "model.name", "'gpt'"),
    ({"parallel.stage": 2, "optim.name": "onebit_adam"}, "optim.name", "1-bit"),
    ({"parallel.stage": 2, "data_efficiency.random_ltd.enabled": True},
     "data_efficiency.random_ltd.enabled", "random-LTD"),
    ({"parallel.stage": 2, "data_efficiency.pld.enabled": True}, "data_efficiency.pld.enabled",
     "layer dropping"),
    ({"parallel.stage": 2, "compression.weight_quantization.enabled": True},
     "compression.weight_quantization.enabled", "compression"),
    ({"parallel.stage": 2, "pipeline.schedule": "interleaved", "pipeline.virtual_stages": 4},
     "pipeline.virtual_stages", "p x v must divide"),
    ({"parallel.stage": 4, "pipeline.schedule": "interleaved", "model.num_layers": 8,
      "microbatches": 2}, "microbatches", "groups of parallel.stage=4"),
    ({"parallel.stage": 2, "pipeline.schedule": "zero_bubble"}, "pipeline.schedule", "1f1b"),
    ({"parallel.stage": 2, "moe.num_experts": 4}, "moe.expert_interval", "expert_interval=1"),
    ({"parallel.stage": 2, "moe.expert_interval": 1, "moe.layer_num_experts": (2, 4, 4, 4)},
     "moe.layer_num_experts", "same expert count"),
    ({"parallel.stage": 2, "parallel.sequence": 2, "moe.num_experts": 4,
      "moe.expert_interval": 1}, "parallel.sequence", "sequence shards"),
    ({"parallel.stage": 2, "pipeline.schedule": "1f1b", "kd.enabled": True,
      "kd.teacher_workdir": "teacher"}, "kd.enabled",
     "1F1B"),
])
def test_bad_pipeline_configs(tiny_config, overrides, key, match):
  tiny_config.model.num_layers = 4
  tiny_config.parallel.data = -1
  for dotted, value in overrides.items():
    section, name = dotted.rsplit(".", 1) if "." in dotted else ("", dotted)
    node = tiny_config
    for part in filter(None, section.split(".")):
      node = node[part]
    node[name] = value
  with pytest.raises(ConfigError, match=match) as error:
    validate(tiny_config, 8)
  assert error.value.key == key


def test_good_pipeline_config_validates(tiny_config):
  tiny_config.model.num_layers = 4
  tiny_config.parallel.update(data=-1, stage=4)
  tiny_config.microbatches = 4
  assert validate(tiny_config, 8)["stage"] == 4


def test_train_step_refuses_sequential_accumulation_of_a_pipeline():
  from jaxspeed.training import StepOptions, make_train_step

  model = PipelinedGPT(_tiny_model_config(), num_stages=2, microbatches=4)
  with pytest.raises(ValueError, match="microbatches=1"):
    make_train_step(model, None, None, None, None, StepOptions(microbatches=4))
