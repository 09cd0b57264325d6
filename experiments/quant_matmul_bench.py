"""int8 vs float32 matmul on this backend for LLM-like shapes, timed in one run.

Variants per shape [M tokens, K] x [K, N], interleaved, median of repeats:
* ``f32``: float32 x @ w;
* ``int8``: int8 x int8 -> int32 ``lax.dot_general`` (the raw integer dot);
* ``w8a8``: ZeroQuant's full linear layer: token-wise int8 activation
  quantization, integer dot, float rescale (``quantized_matmul``);
* ``w4a8``: the same with packed int4 weights (unpacked before the dot on CPU).

  python -m experiments.quant_matmul_bench [--quick]
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from jaxspeed.compression.integer import (
    int8_matmul,
    quantize_to_int,
    quantize_tokens_int8,
    quantized_matmul,
)

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: one small shape, few repeats.")
REPEATS = flags.DEFINE_integer("repeats", 15, "Timed repeats per variant.")

# (tokens, d_in, d_out): attention projections and MLP layers of 1-7B-class models.
SHAPES = [(512, 2048, 2048), (512, 2048, 8192), (512, 8192, 2048), (2048, 4096, 4096)]


def time_variants(fns: dict, args: dict, repeats: int) -> dict[str, float]:
  """Median seconds per call of each jitted fn, the variants interleaved within a repeat."""
  for name, fn in fns.items():  # compile and warm up
    jax.block_until_ready(fn(*args[name]))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def main(argv):
  del argv
  common.setup_devices(1)
  shapes, repeats = ([(128, 512, 512)], 3) if QUICK.value else (SHAPES, REPEATS.value)
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
    t = time_variants(fns, args, repeats)
    gflop = 2 * m * k * n / 1e9
    rows.append({"M": m, "K": k, "N": n, "f32_ms": 1e3 * t["f32"], "int8_ms": 1e3 * t["int8"],
                 "w8a8_ms": 1e3 * t["w8a8"], "w4a8_ms": 1e3 * t["w4a8"],
                 "f32_gflops": gflop / t["f32"], "int8_gops": gflop / t["int8"],
                 "int8_speedup": t["f32"] / t["int8"], "w8a8_speedup": t["f32"] / t["w8a8"],
                 "w4a8_speedup": t["f32"] / t["w4a8"]})
  med = lambda key: float(np.median([r[key] for r in rows]))
  summary = {"int8_speedup": med("int8_speedup"), "w8a8_speedup": med("w8a8_speedup"),
             "w4a8_speedup": med("w4a8_speedup"), "backend": jax.default_backend()}
  header = (f"Median of {repeats} interleaved repeats per variant on {jax.default_backend()}; "
            "speedups are float32 time / variant time, summary = median over shapes. "
            "Paper (ZeroQuant, A100 with custom CUDA kernels): up to 5.19x over FP16 "
            "(unverified; DeepSpeed never released the kernels). Measured here on CPU, where "
            "XLA's int8 dot is the only integer kernel; the Pallas kernels target GPU.")
  common.write_results("quant_matmul_bench", summary, rows,
                       {"shapes": shapes, "repeats": repeats, "quick": QUICK.value}, header)


if __name__ == "__main__":
  app.run(main)
