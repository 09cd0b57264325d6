"""jaxspeed's train step vs a minimal hand-written ``jax.jit`` step, and ZeRO memory.

  python -m experiments.bench_step [--quick]

Part 1 times, interleaved in one process, the library step (microbatching,
sharding constraints, LR schedule, non-finite guard, metrics) against the
smallest step that does the same math: the same flax GPT, token-mean
cross-entropy, global-norm clipping, ``optax.adamw`` with a constant learning
rate. ``overhead_pct`` is how much slower the library step is (negative means
faster). Part 2 reads per-device bytes for ZeRO stages 0-3 at data=8 from the
arrays' shard shapes and from ``compiled.memory_analysis()``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import jaxspeed
from experiments import common

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: tiny model, few steps.")
STEPS = flags.DEFINE_integer("steps", 30, "Timed steps per variant (after warm-up).")


def _config(quick: bool):
  c = jaxspeed.default_config()
  c.batch_size, c.seq_len = (8, 32) if quick else (16, 128)
  c.model.update(num_layers=2 if quick else 4, d_model=64 if quick else 128,
                 d_ff=256 if quick else 512, max_seq_len=c.seq_len)
  c.optim.update(schedule="constant", warmup=0, grad_clip=1.0)
  c.sample_tokens = 0
  return c


def _hand_written_step(model, config):
  """The reference: one jit, no library code."""
  tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                   optax.adamw(config.optim.learning_rate, b1=config.optim.b1,
                               b2=config.optim.b2, eps=config.optim.eps,
                               weight_decay=config.optim.weight_decay))

  def loss_fn(params, inputs, targets):
    logits = model.apply({"params": params}, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, step


def _tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact))


def _time_interleaved(fns, steps: int, block: int = 5) -> list[list[float]]:
  """Alternates blocks of calls to each fn; returns per-call seconds for each."""
  times = [[] for _ in fns]
  for _ in range(max(1, steps // block)):
    for i, fn in enumerate(fns):
      for _ in range(block):
        start = time.perf_counter()
        fn()
        times[i].append(time.perf_counter() - start)
  return times


def _overhead(quick: bool, steps: int) -> dict:
  config = _config(quick)
  config.parallel.data = 1
  setup = jaxspeed.build(config, devices=jax.devices()[:1])
  batch_np = setup.train_data.batch_at(0)
  with jax.set_mesh(setup.mesh):
    lib = {"state": setup.init_state()}
    batch = setup.to_device(batch_np)

    def lib_step():
      lib["state"], metrics = setup.train_step(lib["state"], batch)
      metrics["loss"].block_until_ready()

    tx, hand_step = _hand_written_step(setup.model, config)
    params = jax.device_put(jax.tree.map(jnp.array, lib["state"].params), jax.devices()[0])
    hand = {"params": params, "opt": tx.init(params)}
    inputs = jax.device_put(jnp.asarray(batch_np["inputs"]), jax.devices()[0])
    targets = jax.device_put(jnp.asarray(batch_np["targets"]), jax.devices()[0])

    def hand_written():
      hand["params"], hand["opt"], loss = hand_step(hand["params"], hand["opt"], inputs, targets)
      loss.block_until_ready()

    lib_cost = setup.train_step.lower(lib["state"], batch).compile().cost_analysis()
    hand_cost = hand_step.lower(hand["params"], hand["opt"], inputs, targets).compile() \
        .cost_analysis()
    for fn in (lib_step, hand_written):  # compile and warm up
      for _ in range(3):
        fn()
    lib_times, hand_times = _time_interleaved([lib_step, hand_written], steps)
  tokens = config.batch_size * config.seq_len
  lib_tps, hand_tps = tokens / np.median(lib_times), tokens / np.median(hand_times)
  return {"jaxspeed_tokens_per_s": float(lib_tps), "hand_written_tokens_per_s": float(hand_tps),
          "overhead_pct": float(100 * (hand_tps / lib_tps - 1)),
          # Deterministic: XLA's own count of the work in each compiled step.
          "flops_ratio": float(lib_cost["flops"] / hand_cost["flops"]),
          "bytes_accessed_ratio": float(lib_cost["bytes accessed"] / hand_cost["bytes accessed"]),
          # Bytes of the parameters and optimizer state, the unit of the non-finite guard's traffic
          # (it checks the new state, then selects new or old).
          "guard_read_fraction": float(_tree_bytes((lib["state"].params, lib["state"].opt_state))
                                       / hand_cost["bytes accessed"]),
          "jaxspeed_step_ms_iqr": [float(1e3 * q) for q in np.percentile(lib_times, [25, 75])],
          "hand_step_ms_iqr": [float(1e3 * q) for q in np.percentile(hand_times, [25, 75])]}


def _zero_memory(quick: bool) -> list[dict]:
  rows = []
  for stage in (0, 1, 2, 3):
    config = _config(quick)
    config.parallel.data = -1
    config.zero.stage = stage
    setup = jaxspeed.build(config)
    with jax.set_mesh(setup.mesh):
      state = setup.abstract_state()
      compiled = setup.train_step.lower(
          state, setup.to_device(setup.train_data.batch_at(0))).compile()

    def per_device(tree):
      return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree))

    memory = compiled.memory_analysis()
    rows.append({"zero_stage": stage, "devices": jax.device_count(),
                 "param_bytes_per_device": per_device(state.params),
                 "opt_state_bytes_per_device": per_device(state.opt_state),
                 "state_bytes_per_device": per_device(state),
                 "temp_bytes_per_device": int(memory.temp_size_in_bytes)})
  return rows


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  timing = _overhead(quick, 10 if quick else STEPS.value)
  rows = _zero_memory(quick)
  summary = {k: round(v, 4) for k, v in timing.items() if not k.endswith("iqr")}
  for row in rows:
    summary[f"zero{row['zero_stage']}_bytes_per_device"] = row["state_bytes_per_device"]
  header = (
      "Library train step vs hand-written jit step (1 device, interleaved, median); "
      f"step-time IQR ms: jaxspeed {timing['jaxspeed_step_ms_iqr']}, "
      f"hand-written {timing['hand_step_ms_iqr']}. Target: overhead <= 5%.\n\n"
      "ZeRO (Rajbhandari et al. 2020) claims per-device model-state memory "
      "of 1/N for the sharded parts: stage 1 optimizer state, stage 3 also parameters.")
  common.write_results("bench_step", summary, rows, _config(quick).to_dict(), header)


if __name__ == "__main__":
  app.run(main)
