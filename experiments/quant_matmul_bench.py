"""int8 vs float32 matmul on this backend for LLM-like shapes, timed in one run.

Variants per shape [M tokens, K] x [K, N], timed in alternating blocks
(``common.time_interleaved``), so every variant sees the same load:
* ``f32``: float32 x @ w;
* ``int8``: int8 x int8 -> int32 ``lax.dot_general`` (the raw integer dot);
* ``w8a8``: ZeroQuant's full linear layer: token-wise int8 activation
  quantization, integer dot, float rescale (``quantized_matmul``);
* ``w4a8``: the same with packed int4 weights (unpacked before the dot on CPU).

A speedup is the median over matched blocks of float32 time / variant time,
with its 25th and 75th percentiles (``<variant>_speedup_p25`` / ``_p75``): a
load that drifts during the run widens that spread instead of moving the
median. On CPU, XLA compiles the float32 and the int8 dot alike (one YNNPACK
fusion each, run on the same intra-op thread pool, which has one thread per
core the process may use): the speedup on all cores and on one
(``taskset -c 0 python -m ...``; ``cores`` in the summary) are the two
comparable figures, and neither is an idle-host claim unless the host was idle.

  python -m experiments.quant_matmul_bench [--quick]
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common
from jaxspeed.compression.integer import (
    int8_matmul,
    quantize_to_int,
    quantize_tokens_int8,
    quantized_matmul,
)
from jaxspeed.errors import FlagError

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: one small shape, few repeats.")
REPEATS = flags.DEFINE_integer("repeats", 8, "Rounds of alternating blocks per shape.")
BLOCK = flags.DEFINE_integer("block", 2, "Consecutive timed calls of a variant per round.")

# (tokens, d_in, d_out): attention projections and MLP layers of 1-7B-class models.
SHAPES = [(512, 2048, 2048), (512, 2048, 8192), (512, 8192, 2048), (2048, 4096, 4096)]


def speedups(seconds: dict[str, np.ndarray]) -> dict[str, float]:
  """float32 time / variant time per matched call: median, 25th and 75th percentiles."""
  out = {}
  for name in ("int8", "w8a8", "w4a8"):
    spread = common.ratio_spread(seconds["f32"], seconds[name])
    out.update({f"{name}_speedup": spread["median"], f"{name}_speedup_p25": spread["p25"],
                f"{name}_speedup_p75": spread["p75"]})
  return out


def main(argv):
  del argv
  for holder in (REPEATS, BLOCK):
    if holder.value < 1:
      raise FlagError(holder.name, f"must be >= 1, got {holder.value}")
  common.setup_devices(1)
  shapes, repeats = ([(128, 512, 512)], 3) if QUICK.value else (SHAPES, REPEATS.value)
  block = BLOCK.value
  rng = np.random.default_rng(0)
  fns = {"f32": jax.jit(jnp.matmul), "int8": jax.jit(int8_matmul),
         "w8a8": jax.jit(quantized_matmul), "w4a8": jax.jit(quantized_matmul)}
  rows = []
  for m, k, n in shapes:
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    q8, q4 = quantize_to_int(w, 8), quantize_to_int(w, 4, group_size=128)
    xc, _ = quantize_tokens_int8(x)
    args = {"f32": (x, w), "int8": (xc, q8.codes), "w8a8": (x, q8), "w4a8": (x, q4)}
    calls = {name: (lambda fn=fn, a=args[name]: jax.block_until_ready(fn(*a)))
             for name, fn in fns.items()}
    seconds = common.time_interleaved(calls, repeats, block)
    t = {name: float(np.median(s)) for name, s in seconds.items()}
    gflop = 2 * m * k * n / 1e9
    rows.append({"M": m, "K": k, "N": n, "f32_ms": 1e3 * t["f32"], "int8_ms": 1e3 * t["int8"],
                 "w8a8_ms": 1e3 * t["w8a8"], "w4a8_ms": 1e3 * t["w4a8"],
                 "f32_gflops": gflop / t["f32"], "int8_gops": gflop / t["int8"],
                 **speedups(seconds)})
  med = lambda key: float(np.median([r[key] for r in rows]))
  summary = {key: med(key) for key in rows[0] if "speedup" in key}
  summary.update(cores=len(os.sched_getaffinity(0)), backend=jax.default_backend())
  header = (f"{repeats} rounds of alternating blocks of {block} calls per variant on "
            f"{jax.default_backend()}, {summary['cores']} core(s) available to the process; "
            "speedup = median of float32 time / variant time over matched calls, with its "
            "25th and 75th percentiles (_p25, _p75); the _ms columns are medians; summary = "
            "median over shapes. Paper (ZeroQuant, A100 with custom CUDA kernels): up to 5.19x "
            "over FP16 (unverified; DeepSpeed never released the kernels). Measured here on "
            "CPU, where XLA's int8 dot is the only integer kernel; the Pallas kernels target GPU.")
  common.write_results("quant_matmul_bench", summary, rows,
                       {"shapes": shapes, "repeats": repeats, "block": block,
                        "quick": QUICK.value}, header)


if __name__ == "__main__":
  common.run_app(main)
