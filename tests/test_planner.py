"""Layout planner: enumeration against a hand list, compiled figures, the cost model, errors."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxspeed.comm.hlo import Collective
from jaxspeed.models import ModelConfig
from jaxspeed.planner import (
    PROFILES,
    Compiled,
    Layout,
    NoLayoutFits,
    StepCosts,
    apply_layout,
    collective_axes,
    compile_step,
    enumerate_layouts,
    factorizations,
    measure,
    predict,
    rank,
    step_costs,
)


def _mesh(layout: Layout) -> str:
  return layout.name.split()[0]


def test_factorizations():
  assert sorted(factorizations(4, 2)) == [(1, 4), (2, 2), (4, 1)]
  assert len(list(factorizations(64, 4))) == 84  # C(6 + 3, 3): 2^6 over 4 axes
  assert all(np.prod(f) == 12 for f in factorizations(12, 3))


def test_enumeration_finds_exactly_the_valid_layouts(tiny_config):
  """4 devices over data x stage x tensor, 2 layers, 2 heads: by hand, tensor 4 splits 2 heads
  (rejected), stage 4 exceeds 2 layers (rejected), the other 4 meshes pass."""
  tiny_config.model.num_heads = 2
  layouts, rejected = enumerate_layouts(tiny_config, 4, axes=("data", "stage", "tensor"),
                                        zero_stages=(1,), remats=("none",), microbatches=(1,))
  assert sorted(map(_mesh, layouts)) == sorted(
      ["data4", "data2.stage2", "data2.tensor2", "stage2.tensor2"])
  assert sorted(map(_mesh, rejected)) == ["stage4", "tensor4"]
  assert "model.num_heads" in next(e for lay, e in rejected.items() if _mesh(lay) == "tensor4")
  assert not set(layouts) & set(rejected)  # only accepted layouts go on to be compiled
  # Options cross every mesh; a microbatch count the batch does not divide is rejected.
  more, rejected = enumerate_layouts(tiny_config, 4, axes=("data",), zero_stages=(1, 3),
                                     remats=("none", "full"), microbatches=(1, 3))
  assert len(more) == 4 and {lay.microbatches for lay in rejected} == {3}


@pytest.fixture(scope="module")
def compiled_layouts():
  """ZeRO-3 over 2 data devices, and tensor 2 x data 2 with ZeRO-1, of a 1-layer GPT."""
  from conftest import tiny_config

  config = tiny_config.__wrapped__()
  config.model.num_layers = 1
  config.model.tie_embeddings = False
  shape = lambda **s: tuple((a, s.get(a, 1)) for a in
                            ("data", "fsdp", "stage", "expert", "sequence", "tensor"))
  zero3 = Layout(shape(data=2), 3, "none", 1)
  tp = Layout(shape(data=2, tensor=2), 1, "none", 1)
  return config, {name: (lay, measure(config, lay, jax.devices()[:n]))
                  for name, lay, n in (("zero3", zero3, 2), ("tp", tp, 4))}


def test_memory_is_the_compiled_programs(compiled_layouts):
  config, layouts = compiled_layouts
  layout, compiled = layouts["zero3"]
  again, _ = compile_step(apply_layout(config, layout), jax.devices()[:2])
  memory = again.memory_analysis()
  assert (compiled.argument_bytes, compiled.temp_bytes, compiled.output_bytes) == (
      memory.argument_size_in_bytes, memory.temp_size_in_bytes, memory.output_size_in_bytes)
  assert compiled.peak_bytes == (memory.argument_size_in_bytes + memory.temp_size_in_bytes
                                 + memory.output_size_in_bytes - memory.alias_size_in_bytes)


def test_collective_bytes_by_hand(compiled_layouts):
  """ZeRO-3 on 2 devices (untied head): every parameter is all-gathered for the forward pass
  and its gradient reduced over the pair once (XLA:CPU lowers the reduce-scatter as an
  all-reduce and a slice), give or take scalars XLA folds into them and the 3 LayerNorm vectors
  gathered again for the backward. Tensor parallelism: each layer's attention and MLP outputs
  and their inputs' gradients are all-reduced over the tensor pair, [B/2, S, d] float32 each,
  and the vocabulary-parallel loss reduces its max and sum, [B/2, S] each."""
  config, layouts = compiled_layouts
  model = ModelConfig.from_config(config.model)
  param_bytes = 4 * model.num_params(include_embeddings=True)
  layout, zero3 = layouts["zero3"]
  over_data = [c for c in zero3.collectives if collective_axes(c, layout.shape) == {"data"}]
  reduced = sum(c.result_bytes * c.runs for c in over_data
                if c.op == "all-reduce" and not c.is_scalar)
  gathered = sum(c.result_bytes * c.runs for c in over_data if c.op == "all-gather")
  assert param_bytes <= reduced <= param_bytes + 256
  assert gathered == param_bytes + 3 * config.model.d_model * 4
  layout, tp = layouts["tp"]
  rows = config.batch_size // 2 * config.seq_len
  over_tensor = [c for c in tp.collectives if c.op == "all-reduce"
                 and collective_axes(c, layout.shape) == {"tensor"}]
  activation = rows * config.model.d_model * 4
  assert sum(c.result_bytes * c.runs for c in over_tensor) >= 4 * activation
  assert sum(c.result_bytes == rows * 4 for c in over_tensor) == 2


def test_collective_axes_and_tiers():
  shape = {"data": 2, "fsdp": 1, "stage": 1, "expert": 1, "sequence": 1, "tensor": 4}
  tensor = Collective("all-reduce", 1024, ((0, 1, 2, 3), (4, 5, 6, 7)))
  data = Collective("all-reduce", 1024, ((0, 4), (1, 5), (2, 6), (3, 7)))
  assert collective_axes(tensor, shape) == {"tensor"}
  assert collective_axes(data, shape) == {"data"}
  assert not tensor.crosses(4) and data.crosses(4)


def _costs(flops=1e12, peak=1e9, intra=1e9, inter=0.0):
  keys = [(t, k) for t in ("intra", "inter") for k in ("overlappable", "exposed")]
  sent = dict.fromkeys(keys, 0.0)
  sent["intra", "exposed"], sent["inter", "overlappable"] = intra, inter
  return StepCosts(flops, peak, sent, dict.fromkeys(keys, 1.0))


def test_cost_model_by_hand():
  hw = PROFILES["h100_8x_ib400"].with_overrides(collective_latency=0.0)
  layout = Layout((("data", 8),), 1, "none", 1)
  flops = 989e12 * 0.5  # one second of compute at the achievable fraction
  p = predict(layout, _costs(flops=flops, intra=450e9, inter=50e9 * 0.5), hw, "bfloat16",
              model_flops_per_step=8 * 989e12 * 0.25)
  # 1 s compute + 1 s exposed (NVLink) + 0.5 s over the network, hidden behind compute.
  assert p.compute_s == pytest.approx(1.0)
  assert p.hidden_comm_s == pytest.approx(0.5) and p.step_s == pytest.approx(2.0)
  assert p.mfu == pytest.approx(0.125)
  # Two depths extrapolate linearly: 1 layer costs 10, 2 layers 16 -> 24 layers 148.
  a, b = _costs(flops=10.0), _costs(flops=16.0)
  assert StepCosts.extrapolate(a, 1, b, 2, 24).flops == pytest.approx(148.0)


def test_no_layout_fits_names_the_closest():
  hw = PROFILES["a100_8x_ib200"]
  layouts = [Layout((("data", 8),), z, "none", 1) for z in (1, 3)]
  predictions = [predict(lay, _costs(peak=gib * 2**30), hw, "bfloat16", 1.0)
                 for lay, gib in zip(layouts, (120.0, 90.0), strict=True)]
  with pytest.raises(NoLayoutFits, match=r"closest: data8 z3 .* needs 90.00 GiB; data8 z1"):
    rank(predictions, hw.memory_bytes)
  fits = dataclasses.replace(predictions[0], fits=True)
  assert rank([fits, predictions[1]], hw.memory_bytes) == [fits]


def test_compiled_round_trips_through_json(compiled_layouts):
  _, layouts = compiled_layouts
  _, compiled = layouts["tp"]
  assert Compiled.from_json(compiled.to_json()) == compiled
  assert step_costs(layouts["tp"][0], compiled, 2).flops == compiled.flops
