"""The longest sequence a fixed per-device memory budget admits: sp=1 vs. Ulysses sp=8.

  python -m experiments.long_context [--quick]

For a GPT with RoPE and blockwise attention (``model.attention=blockwise``,
linear activation memory), it compiles the full train step (forward,
backward, AdamW update) for a batch of one sequence of N tokens, once on one
device and once with the sequence split over 8 devices (``parallel.sequence
= 8``), and reads the per-device peak from XLA's ``memory_analysis``
(arguments + outputs − donated aliases + temporaries). Doubling N and then
bisecting finds the largest N (a multiple of ``--granularity``) under
``--budget_mib``. Nothing runs; only compiled programs are measured.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

import jaxspeed
from experiments import common
from jaxspeed.configs import gpt_tiny

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: small budget and model.")
BUDGET_MIB = flags.DEFINE_float("budget_mib", 128.0, "Per-device memory budget.")
GRANULARITY = flags.DEFINE_integer("granularity", 256, "N is searched in multiples of this.")
MAX_SEQ = flags.DEFINE_integer("max_seq", 65536, "Search no further than this length.")
SP = 8


def _config(seq_len: int, sp: int, quick: bool):
  config = gpt_tiny.get_config()
  config.update(batch_size=1, seq_len=seq_len, sample_tokens=0, microbatches=1)
  config.model.update(max_seq_len=seq_len, position="rope", attention="blockwise",
                      remat="full", num_heads=8, d_model=64 if quick else 128,
                      d_ff=256 if quick else 512, num_layers=2 if quick else 4)
  config.parallel.update(data=1, fsdp=1, tensor=1, sequence=sp)
  config.zero.stage = 0
  return config


def peak_bytes(seq_len: int, sp: int, quick: bool) -> int:
  """Per-device peak of the compiled train step for one sequence of ``seq_len`` tokens."""
  config = _config(seq_len, sp, quick)
  setup = jaxspeed.build(config, devices=jax.devices()[:sp])
  with jax.set_mesh(setup.mesh):
    batch = {k: jax.ShapeDtypeStruct((1, seq_len), np.int32,
                                     sharding=jaxspeed.training.step.batch_sharding(setup.mesh))
             for k in ("inputs", "targets")}
    stats = setup.train_step.lower(setup.abstract_state(), batch).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def longest(sp: int, budget: float, unit: int, cap: int, quick: bool, rows: list) -> int:
  """Largest multiple of ``unit`` up to ``cap`` whose peak fits ``budget``.

  Doubling, then bisection; a result equal to ``cap`` means "at least".
  """
  def fits(n: int) -> bool:
    peak = peak_bytes(n, sp, quick)
    rows.append({"sp": sp, "seq_len": n, "peak_mib": peak / 2**20, "fits": peak <= budget})
    print(rows[-1], flush=True)
    return peak <= budget

  if not fits(unit):
    return 0
  low = unit
  while 2 * low <= cap and fits(2 * low):
    low *= 2
  if 2 * low > cap:
    return low
  high = 2 * low  # low fits, high does not
  while high - low > unit:
    mid = (low + high) // 2 // unit * unit
    low, high = (mid, high) if fits(mid) else (low, mid)
  return low


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  # Quick: five small compilations (compile time grows with the length); one device fits
  # 64 tokens (128 need 4.7 MiB), eight reach the cap of 4x that.
  budget = (4.5 if quick else BUDGET_MIB.value) * 2**20
  unit = 64 if quick else GRANULARITY.value
  cap = 256 if quick else MAX_SEQ.value
  rows = []
  single = longest(1, budget, unit, cap, quick, rows)
  parallel = longest(SP, budget, unit, cap, quick, rows)
  summary = {"budget_mib": budget / 2**20, "max_seq_sp1": single, "max_seq_sp8": parallel,
             "max_seq_ratio_sp8": parallel / single if single else float("nan")}
  header = ("Paper (DeepSpeed-Ulysses): 4x longer sequences than existing systems. Here: the "
            "longest sequence whose compiled train step fits the per-device budget, one device "
            "vs. 8-way sequence parallelism, blockwise attention and full remat in both.")
  common.write_results("long_context", summary, sorted(rows, key=lambda r: (r["sp"],
                                                                            r["seq_len"])),
                       {"budget_mib": budget / 2**20, "granularity": unit, "quick": quick},
                       header)


if __name__ == "__main__":
  app.run(main)
