"""KV-cache compression: memory kept vs quality, per policy and budget.

  python -m experiments.kv_compression [--quick]

A GPT with a 1024-token context is trained on the default corpus (Python's
docs and sources, byte-level). On held-out sequences the first ``--prompt``
tokens are prefilled (full attention; FastGen profiles its heads here), the
cache is compressed, and every later token is fed one at a time (teacher
forcing) through the compressed cache, which evicts or merges as it goes. For
each policy and budget (kept tokens per head as a share of the 1024-slot
cache) we report:

* ``kv_bytes_ratio``: bytes of all arrays of the compressed caches / bytes of
  the full cache (positions, scores and quantization scales included);
* ``ppl_ratio``: perplexity of the continuation / the full cache's;
* ``agreement``: share of positions whose argmax next token equals the full
  cache's.

Paper directions: FastGen (Ge et al. 2024) large memory reduction with
negligible quality loss; MiniKV (Sharma et al. 2024) ~86% KV compression with
>98.5% of accuracy recovered; KVMerger (Wang et al. 2024) better than H2O
eviction at 50% and 35% budgets.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import common
from jaxspeed.configs import gpt_tiny
from jaxspeed.inference import Generator
from jaxspeed.inference import builders as inference_builders
from jaxspeed.inference.builders import make_policy
from jaxspeed.inference.kv_policies import KvPolicyConfig
from jaxspeed.training import read_metrics

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: seq 128, 2-layer model, 10 steps, "
                          "budget 50% only.")
STEPS = flags.DEFINE_integer("steps", 80, "Training steps.")
PROMPT = flags.DEFINE_integer("prompt", 256, "Prefilled tokens per held-out sequence.")
EVAL_ROWS = flags.DEFINE_integer("eval_rows", 4, "Held-out sequences.")
REUSE = flags.DEFINE_bool("reuse_run", False, "Evaluate the model a previous run of this "
                          "experiment trained in --output_dir instead of training again.")
POLICIES = ("local", "h2o", "fastgen", "minikv", "kvmerger")
BUDGETS = (0.5, 0.35, 0.2)


def train_config(quick: bool):
  config = gpt_tiny.get_config()
  config.parallel.update(data=-1, fsdp=1, tensor=1)
  config.zero.stage = 0
  config.sample_tokens = 0
  config.batch_size = 8
  config.seq_len = config.model.max_seq_len = 128 if quick else 1024
  config.model.update(position="rope", num_layers=2 if quick else 4, d_model=64 if quick else 128,
                      d_ff=256 if quick else 512, num_heads=4)
  config.steps = 10 if quick else STEPS.value
  config.log_every = max(1, config.steps // 10)
  config.eval_every = config.checkpoint_every = config.steps
  config.eval_batches = 2
  config.optim.warmup = max(1, config.steps // 10)
  return config


def continuation_stats(logits: jax.Array, tokens: np.ndarray, prompt: int):
  """(mean NLL of tokens[prompt:], argmax ids) from logits [B, N - prompt, V]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  targets = jnp.asarray(tokens[:, prompt:])
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
  return float(nll), np.asarray(logits.argmax(-1))


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
  common.setup_devices()
  quick = QUICK.value
  config = train_config(quick)
  workdir = os.path.join(common.OUTPUT_DIR.value, "kv_compression_run")
  if REUSE.value and os.path.exists(os.path.join(workdir, "checkpoints")):
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
  else:
    val_loss = common.fresh_run(config, workdir)[0]["val_loss"]
  setup, params = inference_builders.load_params(config, workdir)
  params = jax.device_get(params)
  cache_len = config.seq_len
  prompt = 32 if quick else PROMPT.value
  rows_n = 2 if quick else EVAL_ROWS.value
  tokens = np.concatenate([setup.val_data.batch_at(i)["inputs"] for i in range(
      math.ceil(rows_n / config.batch_size))])[:rows_n]
  punct = inference_builders.punctuation_ids(setup.tokenizer)

  full = Generator(setup.model, params, cache_len=cache_len)
  full_nll, full_ids = continuation_stats(full.teacher_forced_logits(tokens, prompt), tokens,
                                          prompt)
  full_bytes = full.cache_bytes(len(tokens), prompt)
  rows = [{"policy": "full", "budget": 1.0, "kv_bytes": full_bytes, "kv_bytes_ratio": 1.0,
           "ppl": math.exp(full_nll), "ppl_ratio": 1.0, "agreement": 1.0}]
  summary = {"full_ppl": math.exp(full_nll), "train_val_loss": val_loss,
             "context": cache_len, "prompt": prompt}
  for name in POLICIES:
    for budget in BUDGETS[:1] if quick else BUDGETS:
      policy = make_policy(KvPolicyConfig(policy=name, budget=budget, punct_ids=tuple(punct)),
                           cache_len)
      generator = Generator(setup.model, params, cache_len=cache_len, policy=policy)
      nll, ids = continuation_stats(generator.teacher_forced_logits(tokens, prompt), tokens,
                                    prompt)
      kv_bytes = generator.cache_bytes(len(tokens), prompt)
      key = f"{name}_{round(budget * 100)}"
      row = {"policy": name, "budget": budget, "kv_bytes": kv_bytes,
             "kv_bytes_ratio": kv_bytes / full_bytes, "ppl": math.exp(nll),
             "ppl_ratio": math.exp(nll - full_nll), "agreement": float((ids == full_ids).mean())}
      rows.append(row)
      summary.update({f"{key}_ppl_ratio": row["ppl_ratio"],
                      f"{key}_kv_bytes_ratio": row["kv_bytes_ratio"],
                      f"{key}_agreement": row["agreement"]})
      print(f"{key}: {row}", flush=True)

  m = config.model
  header = (
      f"GPT {m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads (head dim "
      f"{m.d_model // m.num_heads}), RoPE, context {cache_len}, trained {config.steps} steps "
      f"(val loss {val_loss:.3f}). {rows_n} held-out sequences: {prompt} prompt tokens "
      f"prefilled, the other {cache_len - prompt} teacher-forced through the compressed cache. "
      "budget = kept tokens per head / cache length; kv_bytes = all arrays of the caches "
      "(float32 full cache = 1). Paper directions: FastGen large memory reduction with "
      "negligible quality loss; MiniKV ~86% KV compression with >98.5% accuracy recovered; "
      "KVMerger better than H2O at 50%/35% budgets.")
  common.write_results("kv_compression", summary, rows, config.to_dict(), header)


if __name__ == "__main__":
  app.run(main)
