"""Activation memory of causal attention vs. sequence length: xla, blockwise, flash.

  python -m experiments.attention_memory [--quick]

Claim (Dao et al. 2022, FlashAttention, Sec. 4.3 and Fig. 3): the memory
footprint grows linearly with the sequence length, up to 20x below exact
attention that materializes the [S, T] scores.

For each ``model.attention`` implementation and sequence length S, compiles
the gradient of sum(attention(q, k, v, mask=causal_mask(S))) with respect to
q, k, v (one sequence, ``--heads`` heads of ``--head_dim``, float32) and reads
the temporary bytes per device from XLA's ``memory_analysis()``: everything
the backward pass keeps or recomputes, excluding the inputs and gradients.
Deterministic (no wall clock). ``flash`` is compiled in the Pallas
interpreter on CPU; its buffers are those of the kernels' blocks and outputs.

Summary: ``<impl>_temp_growth`` = temp bytes at the longest / the shortest S
(linear: equal to ``seq_growth``; quadratic: its square), and
``xla_over_flash_at_max`` = xla / flash temp bytes at the longest S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import common
from jaxspeed.models import ATTENTION_IMPLS, causal_mask

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: S in 256, 1024.")
SEQ_LENS = flags.DEFINE_list("seq_lens", ["256", "1024", "4096"], "Sequence lengths.")
IMPLS = flags.DEFINE_list("impls", ["xla", "blockwise", "flash"], "model.attention values.")
HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")


def gradient_temp_bytes(impl: str, seq_len: int, heads: int, head_dim: int) -> int:
  """Temp bytes per device of the causal attention gradient w.r.t. q, k, v."""
  attend = ATTENTION_IMPLS[impl]
  spec = jax.ShapeDtypeStruct((1, seq_len, heads, head_dim), jnp.float32)
  loss = lambda q, k, v: jnp.sum(attend(q, k, v, mask=causal_mask(seq_len)))
  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(spec, spec, spec).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  common.setup_devices()
  seq_lens = [256, 1024] if QUICK.value else [int(s) for s in SEQ_LENS.value]
  rows, temp = [], {}
  for impl in IMPLS.value:
    for seq_len in seq_lens:
      temp[impl, seq_len] = gradient_temp_bytes(impl, seq_len, HEADS.value, HEAD_DIM.value)
      rows.append({"attention": impl, "seq_len": seq_len,
                   "temp_mb": temp[impl, seq_len] / 2**20,
                   "vs_shortest": temp[impl, seq_len] / temp[impl, seq_lens[0]]})
  shortest, longest = seq_lens[0], seq_lens[-1]
  summary = {f"{impl}_temp_growth": temp[impl, longest] / temp[impl, shortest]
             for impl in IMPLS.value}
  summary["seq_growth"] = longest / shortest
  if {"xla", "flash"} <= set(IMPLS.value):
    summary["xla_over_flash_at_max"] = temp["xla", longest] / temp["flash", longest]
  summary["claim"] = "memory linear in S; up to 20x below exact attention"
  header = (
      f"Temp memory per device (XLA memory_analysis, {jax.default_backend()}) of the gradient "
      f"of causal attention w.r.t. q, k, v: batch 1, {HEADS.value} heads of {HEAD_DIM.value}, "
      f"float32. Paper (FlashAttention, Fig. 3): memory grows linearly with S, up to 20x "
      f"below exact attention. Ours: S grows {summary['seq_growth']:g}x.")
  config = {"seq_lens": seq_lens, "impls": IMPLS.value, "heads": HEADS.value,
            "head_dim": HEAD_DIM.value}
  common.write_results("attention_memory", summary, rows, config, header)


if __name__ == "__main__":
  app.run(main)
