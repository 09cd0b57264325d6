"""ZeRO++'s quantized weight all-gather (qwZ): bytes moved and the loss it costs.

  python -m experiments.zeropp [--quick]

Wang et al. 2023 (ZeRO++) quantize each ZeRO-3 parameter slice to int8 with
block scales before the all-gather: half the bytes of an fp16 gather (a
quarter of float32). On 8 devices (``data=2`` x ``fsdp=4``, ZeRO-3) it

* compiles the parameter all-gather of the GPT alone, exact and through
  ``jaxspeed.parallel.zeropp.qwz_gather`` (the embedding stays exact), and
  reads the bytes each device sends from the compiled HLO
  (``jaxspeed.comm.hlo``): the parameters' share of ZeRO-3 communication,
  without the step's other collectives;
* trains the GPT with exact ZeRO-3 and with ``zero.quantized_weights`` for
  ``--steps`` steps on the same data: ``zeropp_loss_rel_gap`` is the relative
  gap of the final validation loss (target: within 1% after 300 steps).

Not built: hpZ (the node-local secondary copy) and qgZ (int4 gradient
all-to-all), ZeRO++'s other two parts.
"""

from __future__ import annotations

import os

import jax
from absl import flags

import jaxspeed
from experiments import common
from jaxspeed.comm.hlo import collectives
from jaxspeed.configs import gpt_tiny
from jaxspeed.parallel.rules import named
from jaxspeed.parallel.zeropp import qwz_gather

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: the gather bytes of a 2-layer model, "
                          "no training (tests/test_zeropp.py trains with qwZ).")
STEPS = flags.DEFINE_integer("steps", 300, "Training steps of each run.")


def _config(quick: bool, quantized: bool):
  config = gpt_tiny.get_config()
  config.fit_parallel = False
  config.parallel.update(data=2, fsdp=4, tensor=1)
  config.zero.update(stage=3, quantized_weights=quantized)
  config.steps = STEPS.value
  config.sample_tokens = 0
  config.eval_every = config.steps
  config.checkpoint_every = config.steps
  config.log_every = max(1, config.steps // 10)
  if quick:
    config.model.num_layers = 2
  return config


def gather_bytes(config) -> dict[str, float]:
  """Bytes per device of the parameters' ZeRO-3 all-gather: exact and int8 (qwZ)."""
  setup = jaxspeed.build(config)
  params = setup.abstract_state().params
  specs, tensor_parallel = setup.specs.state.params, setup.specs.tensor_parallel
  gathered = named(setup.mesh, tensor_parallel)
  programs = {"exact": lambda p: p,
              "qwz": lambda p: qwz_gather(p, specs, tensor_parallel, setup.mesh)}
  out = {}
  with jax.set_mesh(setup.mesh):
    for name, fn in programs.items():
      hlo = jax.jit(fn, out_shardings=gathered).lower(params).compile().as_text()
      ops = [c for c in collectives(hlo, setup.mesh.size) if c.op == "all-gather"]
      out[name] = sum(c.sent_bytes for c in ops)
  return out


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  moved = gather_bytes(_config(quick, False))
  rows = [{"run": name, "param_gather_bytes_per_device": moved[name]}
          for name in ("exact", "qwz")]
  summary = {"qwz_param_gather_bytes_ratio": moved["qwz"] / moved["exact"]}
  if not quick:
    for row in rows:
      config = _config(quick, row["run"] == "qwz")
      run, _ = common.fresh_run(config, os.path.join(common.OUTPUT_DIR.value, "zeropp",
                                                     row["run"]))
      row.update(val_loss=run["val_loss"], final_train_loss=run["final_loss"],
                 initial_val_loss=run["initial_val_loss"], tokens_per_s=run["tokens_per_s"])
      print(row, flush=True)
    summary.update(zeropp_loss_rel_gap=rows[1]["val_loss"] / rows[0]["val_loss"] - 1,
                   steps=STEPS.value, target_loss_rel_gap=0.01)
  header = ("ZeRO++ qwZ on 8 devices (data=2 x fsdp=4, ZeRO-3, float32 parameters). Paper: "
            "int8 weights halve an fp16 all-gather, so a quarter of float32 is the ideal "
            "here, plus one float32 scale per slice of the split dimension; 1-D parameters "
            "(biases, LayerNorm) and the tied embedding / LM head are gathered exactly. "
            "Bytes per device from the compiled HLO of the parameter gather alone.")
  common.write_results("zeropp", summary, rows, _config(quick, True).to_dict(), header)


if __name__ == "__main__":
  common.run_app(main)
