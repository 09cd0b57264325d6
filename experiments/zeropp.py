"""ZeRO++ (qwZ, hpZ, qgZ) and the explicit ZeRO-2/3 reduce-scatter: bytes and loss.

  python -m experiments.zeropp [--quick]

Wang et al. 2023 (ZeRO++) cut ZeRO-3's communication three ways: int8 weights
in the forward all-gather (qwZ), a node-local secondary copy of the
parameters so the gathers stay inside the node (hpZ), and int4 gradients in a
hierarchical reduce-scatter (qgZ): 4x less cross-node traffic. On 8 devices
as two nodes of four (``data=2`` across nodes x ``fsdp=4`` inside one, ZeRO-3,
float32 parameters) it compiles the GPT's train step for each of ``VARIANTS``
and reads from the HLO (``jaxspeed.comm.hlo``) the bytes each device sends:
all-gathers (the parameters), reduce-scatters, all-reduces and all-to-alls
(the gradients), and which collectives cross nodes (a device group spanning
both halves of the mesh; such a collective is charged wholly to the
cross-node link, the slower one). ``zeropp_cross_node_bytes_ratio`` divides
ZeRO++'s (all three) cross-node bytes by ZeRO-3's as the compiler lowers it
(paper: 0.25); ``..._vs_reduce_scatter`` by ZeRO-3 with the explicit
reduce-scatter, the fairer baseline here. ``qwz_param_gather_bytes_ratio``:
qwZ's all-gather bytes against the exact gather's (a quarter of float32 plus
the scales, with the embedding and 1-D parameters exact).

Gradient reduction: ``zero2_grad_bytes_ratio_vs_allreduce`` (and ``zero3_...``)
divide the gradient collectives' bytes with ``zero.reduce_scatter`` by those
without (XLA:CPU compiles an all-reduce and a slice) on ``data=8`` / ``fsdp=8``;
ideal (N−1)/N against 2(N−1)/N, 0.5.

Full run: each variant trains ``--steps`` steps on the same data;
``*_loss_rel_gap`` is the relative gap of its final validation loss to exact
ZeRO-3 (target: within 1% after 300 steps). ``projection_*`` keys are
arithmetic, not measurements: the measured bytes per parameter, scaled to a
1.3B-parameter model on two 8-GPU nodes (``LINKS``).
"""

from __future__ import annotations

import os

import jax
from absl import flags

import jaxspeed
from experiments import common
from jaxspeed.comm.hlo import collectives
from jaxspeed.configs import gpt_tiny

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: the bytes of a 2-layer model, "
                          "no training (tests/test_zeropp.py trains with qwZ).")
STEPS = flags.DEFINE_integer("steps", 300, "Training steps of each run.")


# name: the ``zero`` settings on top of ZeRO-3 over data=2 x fsdp=4.
VARIANTS = {
    "zero3": {},
    "zero3_reduce_scatter": {"reduce_scatter": True},
    "qwz": {"quantized_weights": True},
    "hpz": {"hpz_partition_size": 4},
    "qgz": {"quantized_gradients": True},
    "zeropp": {"quantized_weights": True, "hpz_partition_size": 4, "quantized_gradients": True},
}
TRAINED = ("zero3", "qwz", "hpz", "qgz", "zeropp")
DEVICES_PER_NODE = 4
# The projection's network, per direction and device: NVLink inside a node, a 100 Gb/s
# InfiniBand link per GPU across nodes (the paper's low-bandwidth setting).
LINKS = {"intra_node": 150e9, "cross_node": 12.5e9}
PROJECTED_PARAMS = 1.3e9


def _config(quick: bool, zero: dict, layout: dict | None = None):
  config = gpt_tiny.get_config()
  config.fit_parallel = False
  config.parallel.update(layout or {"data": 2, "fsdp": DEVICES_PER_NODE, "tensor": 1})
  config.zero.update(stage=3, **zero)
  config.steps = STEPS.value
  config.sample_tokens = 0
  config.eval_every = config.steps
  config.checkpoint_every = config.steps
  config.log_every = max(1, config.steps // 10)
  if quick:
    config.model.num_layers = 2
  return config


def step_bytes(config) -> dict[str, float]:
  """Bytes per device of the compiled train step's collectives, by kind and by whether
  they cross nodes, and its temporary memory."""
  setup = jaxspeed.build(config)
  with jax.set_mesh(setup.mesh):
    compiled = setup.train_step.lower(setup.abstract_state(),
                                      setup.to_device(setup.train_data.batch_at(0))).compile()
  ops = [c for c in collectives(compiled.as_text(), setup.mesh.size) if not c.is_scalar]
  total = lambda selected: sum(c.sent_bytes for c in selected)
  return {"params": sum(x.size for x in jax.tree.leaves(setup.abstract_state().params)),
          "gather_bytes": total(c for c in ops if c.op == "all-gather"),
          "grad_bytes": total(c for c in ops
                              if c.op in ("all-reduce", "reduce-scatter", "all-to-all")),
          "cross_node_bytes": total(c for c in ops if c.crosses(DEVICES_PER_NODE)),
          "intra_node_bytes": total(c for c in ops if not c.crosses(DEVICES_PER_NODE)),
          "reduce_scatter_ops": sum(c.op == "reduce-scatter" for c in ops),
          "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  rows, moved = [], {}
  for name, zero in VARIANTS.items():
    moved[name] = step_bytes(_config(quick, zero))
    rows.append({"run": name, **moved[name]})
    print(rows[-1], flush=True)
  cross = {name: m["cross_node_bytes"] for name, m in moved.items()}
  summary = {
      "qwz_param_gather_bytes_ratio": (moved["qwz"]["gather_bytes"]
                                       / moved["zero3_reduce_scatter"]["gather_bytes"]),
      "hpz_cross_node_bytes_ratio": cross["hpz"] / cross["zero3"],
      "qgz_grad_bytes_ratio": (moved["qgz"]["grad_bytes"]
                               / moved["zero3_reduce_scatter"]["grad_bytes"]),
      "zeropp_cross_node_bytes_ratio": cross["zeropp"] / cross["zero3"],
      "zeropp_cross_node_bytes_ratio_vs_reduce_scatter": (cross["zeropp"]
                                                           / cross["zero3_reduce_scatter"]),
  }
  for name in ("zero3", "zeropp"):
    per_param = {k: moved[name][f"{k}_bytes"] / moved[name]["params"]
                 for k in ("cross_node", "intra_node")}
    summary[f"projection_1p3b_comm_s_{name}"] = sum(
        PROJECTED_PARAMS * per_param[link] / rate for link, rate in LINKS.items())
  for stage, layout in ((2, {"data": 8, "fsdp": 1, "tensor": 1}),
                        (3, {"data": 1, "fsdp": 8, "tensor": 1})):
    reduced = {}
    for explicit in (False, True):
      config = _config(True, {"reduce_scatter": explicit}, layout)
      config.zero.stage = stage
      reduced[explicit] = step_bytes(config)
      rows.append({"run": f"zero{stage} on {config.parallel.data * config.parallel.fsdp} "
                          f"devices, {'reduce-scatter' if explicit else 'compiler'}",
                   **reduced[explicit]})
      print(rows[-1], flush=True)
    summary[f"zero{stage}_grad_bytes_ratio_vs_allreduce"] = (
        reduced[True]["grad_bytes"] / reduced[False]["grad_bytes"])
  if not quick:
    losses = {}
    for row in rows:
      if row["run"] not in TRAINED:
        continue
      run, _ = common.fresh_run(_config(quick, VARIANTS[row["run"]]),
                                os.path.join(common.OUTPUT_DIR.value, "zeropp", row["run"]))
      row.update(val_loss=run["val_loss"], final_train_loss=run["final_loss"],
                 initial_val_loss=run["initial_val_loss"], tokens_per_s=run["tokens_per_s"])
      losses[row["run"]] = run["val_loss"]
      print(row, flush=True)
    for name in TRAINED[1:]:
      summary[f"{name}_loss_rel_gap"] = losses[name] / losses["zero3"] - 1
    summary.update(steps=STEPS.value, target_loss_rel_gap=0.01)
  header = ("ZeRO++ on 8 devices as two nodes of four (data=2 across nodes x fsdp=4 inside, "
            "ZeRO-3, float32 parameters; gpt_tiny, 2 layers in --quick and in the zero2/zero3 "
            "rows). Bytes each device "
            "sends per train step, from the compiled HLO; a collective whose device groups "
            "span both nodes counts as cross-node. zero3: the compiler's gathers and "
            "gradient all-reduce; the other variants compute each gradient per device with "
            "the collectives written out (zero3_reduce_scatter: exact). qwZ: int8 forward "
            "gather (embedding and 1-D parameters exact); hpZ: gathered across nodes into a "
            "node-local secondary copy, then inside the node, the gradient reduced the same "
            "way round; qgZ: the cross-node gradient reduce-scatter as one int4 all-to-all. "
            "zero2/zero3 rows: gradient bytes with and without zero.reduce_scatter on 8 "
            "devices. temp_mib is XLA's temporary memory of the step. projection_* keys are "
            "arithmetic, not measurements: bytes per parameter times 1.3B over 150 GB/s "
            "inside a node and 12.5 GB/s across nodes, per device, without overlap.")
  common.write_results("zeropp", summary, rows, _config(quick, VARIANTS["zeropp"]).to_dict(),
                       header)


if __name__ == "__main__":
  common.run_app(main)
