"""Decoding speed: the KV cache vs recomputing the prefix, and tensor-parallel generation.

  python -m experiments.generate_bench [--quick]

DeepSpeed Inference (Aminabadi et al. 2022) keeps every layer's keys and values
so that each new token costs one token's forward pass; without a cache the
whole prefix is run again for every token. For prompts of 128, 512 and 1024
tokens we time ``--new_tokens`` greedy decode steps of a random-weight GPT
(speed does not depend on the weights) both ways, interleaved, and report the
median of ``--repeats`` as tokens/s and their ratio (``cache_speedup_<len>``).
The recompute baseline is one jitted program over a fixed [B, len + new]
buffer, so it never recompiles either.

Tensor parallelism: the same engine on meshes with ``tensor`` = 1, 2, 4 (heads,
MLP and vocabulary split; one all-reduce after attention and one after the
MLP per layer). We check the tokens equal the single-device ones and read the
all-reduce bytes per decode step from the compiled HLO. On this host the
"devices" are threads sharing 2 cores, so tokens/s shows overhead, not speedup.
"""

from __future__ import annotations

import contextlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from jaxspeed.comm.hlo import communication
from jaxspeed.inference import Generator, SamplingConfig
from jaxspeed.models import GPT, ModelConfig
from jaxspeed.parallel import make_mesh

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: a 2-layer d_model 64 model, 4 tokens.")
NEW_TOKENS = flags.DEFINE_integer("new_tokens", 16, "Decode steps timed per measurement.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved repeats; the median is reported.")
BATCH = flags.DEFINE_integer("batch", 4, "Rows decoded together.")
PROMPT_LENGTHS = (128, 512, 1024)
TP_SIZES = (1, 2, 4)
TP_PROMPT = 512


def model_config(quick: bool, max_len: int) -> ModelConfig:
  if quick:
    return ModelConfig(vocab_size=256, num_layers=2, num_heads=4, d_model=64, d_ff=256,
                       max_seq_len=max_len, position="rope")
  return ModelConfig(vocab_size=256, num_layers=4, num_heads=8, d_model=256, d_ff=1024,
                     max_seq_len=max_len, position="rope")


def prompts(batch: int, length: int) -> list[list[int]]:
  rng = np.random.default_rng(length)
  return rng.integers(0, 256, (batch, length)).tolist()


def cached_decode_seconds(generator: Generator, rows, steps: int) -> tuple[float, list[int]]:
  """Wall seconds of ``steps`` greedy decode steps after prefill (prefill not timed)."""
  caches, logits, lengths = generator.prefill(rows)
  tokens = jnp.argmax(logits, -1).astype(jnp.int32)
  jax.block_until_ready((caches, tokens))
  key = jax.random.PRNGKey(0)
  out = []
  start = time.perf_counter()
  for i in range(steps):
    caches, tokens, _ = generator.decode_step(caches, tokens, jnp.asarray(lengths + i), key)
    out.append(tokens)
  jax.block_until_ready(tokens)
  return time.perf_counter() - start, np.asarray(jnp.stack(out)).T.tolist()


def make_recompute_step(model: GPT):
  """One greedy token by running the model over the whole fixed-size buffer."""
  def step(params, buffer, position):
    logits = model.apply({"params": params}, buffer)
    nxt = jnp.argmax(jnp.take_along_axis(logits, (position - 1)[:, None, None], 1)[:, 0], -1)
    return buffer.at[jnp.arange(buffer.shape[0]), position].set(nxt.astype(jnp.int32))
  return jax.jit(step, donate_argnums=1)


def recompute_seconds(step, params, rows, steps: int) -> float:
  length = len(rows[0])
  buffer = np.zeros((len(rows), length + steps), np.int32)
  buffer[:, :length] = rows
  buffer = jnp.asarray(buffer)
  position = jnp.full((len(rows),), length, jnp.int32)
  buffer = step(params, buffer, position)  # the first token comes from the prompt alone
  jax.block_until_ready(buffer)
  start = time.perf_counter()
  for i in range(1, steps + 1):
    buffer = step(params, buffer, position + i)
  jax.block_until_ready(buffer)
  return time.perf_counter() - start


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  steps, repeats = (4, 1) if quick else (NEW_TOKENS.value, REPEATS.value)
  batch = BATCH.value
  max_len = max(PROMPT_LENGTHS) + steps + 1
  cfg = model_config(quick, max_len)
  model = GPT(cfg)
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))()
  params = nn.meta.unbox(params["params"])
  rows, summary = [], {}

  recompute = make_recompute_step(model)
  for length in PROMPT_LENGTHS:
    generator = Generator(model, params, cache_len=length + steps + 1)
    batch_prompts = prompts(batch, length)
    cached_decode_seconds(generator, batch_prompts, 2)  # compile
    recompute_seconds(recompute, params, batch_prompts, 1)
    cached, full = [], []
    for _ in range(repeats):
      cached.append(cached_decode_seconds(generator, batch_prompts, steps)[0])
      full.append(recompute_seconds(recompute, params, batch_prompts, steps))
    cache_tps = batch * steps / float(np.median(cached))
    full_tps = batch * steps / float(np.median(full))
    summary[f"cache_speedup_{length}"] = cache_tps / full_tps
    rows.append({"benchmark": "kv cache vs recompute", "prompt": length, "tp": 1,
                 "cache_tokens_per_s": cache_tps, "recompute_tokens_per_s": full_tps,
                 "speedup": cache_tps / full_tps, "allreduce_bytes_per_step": 0.0,
                 "same_tokens_as_tp1": True})

  reference, base_tps = None, None
  tp_prompts = prompts(batch, TP_PROMPT)
  for tp in TP_SIZES:
    mesh = make_mesh({"tensor": tp}, jax.devices()[:tp]) if tp > 1 else None
    generator = Generator(model, params, cache_len=TP_PROMPT + steps + 1, mesh=mesh)
    _, tokens = cached_decode_seconds(generator, tp_prompts, steps)  # compiles
    reference = reference or tokens
    seconds = float(np.median([cached_decode_seconds(generator, tp_prompts, steps)[0]
                               for _ in range(repeats)]))
    caches, logits, lengths = generator.prefill(tp_prompts)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      hlo = generator._decode.lower(generator.params, caches, jnp.argmax(logits, -1),
                                    jnp.asarray(lengths), jax.random.PRNGKey(0),
                                    sampling=SamplingConfig()).compile().as_text()
    comm = communication(hlo, tp)["bytes"] if tp > 1 else 0.0
    tps = batch * steps / seconds
    base_tps = base_tps or tps
    summary[f"tp{tp}_tokens_per_s_ratio"] = tps / base_tps
    summary[f"tp{tp}_same_tokens"] = tokens == reference
    summary[f"tp{tp}_allreduce_bytes_per_step"] = comm
    rows.append({"benchmark": "tensor parallel", "prompt": TP_PROMPT, "tp": tp,
                 "cache_tokens_per_s": tps, "recompute_tokens_per_s": float("nan"),
                 "speedup": tps / base_tps, "allreduce_bytes_per_step": comm,
                 "same_tokens_as_tp1": tokens == reference})

  header = (
      f"GPT {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, batch "
      f"{batch}, {steps} greedy decode steps, median of {repeats} interleaved repeats. "
      "speedup = tokens/s with the KV cache / tokens/s recomputing the prefix (one jitted "
      "program each). Tensor-parallel rows: same engine on tensor = 1/2/4 virtual CPU devices "
      "(threads on 2 shared cores: no speedup expected here), all-reduce bytes per decode "
      "step from the compiled HLO. Paper (DeepSpeed Inference, Aminabadi et al. 2022): KV "
      "caching makes per-token cost independent of the prefix; TP cuts latency on GPUs.")
  config = {"model": cfg.__dict__, "new_tokens": steps, "repeats": repeats, "batch": batch}
  common.write_results("generate_bench", summary, rows, config, header)


if __name__ == "__main__":
  app.run(main)
