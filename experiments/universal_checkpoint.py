"""Universal checkpointing: a checkpoint of one layout resumes on another, with the same losses.

  python -m experiments.universal_checkpoint [--quick]

Claim (Lian et al. 2024, arXiv 2406.18820): a run saved under one
data/tensor/pipeline/sequence/ZeRO layout resumes under any other with
matching loss, at negligible reconfiguration cost.

For each pair of layouts (A, B): train ``--steps_before`` steps on A and save;
then (a) continue ``--steps_after`` steps on A and (b) restore the checkpoint
on B and train the same steps on the same batches. Reported per pair: the
largest relative difference between the losses of (a) and (b), and the time
of the restore on B (reading, converting and placing the state). The pairs
cover every mesh axis, each ZeRO stage, pipeline on/off and another stage
count, a device-count change, an MoE model under a new expert-parallel
degree, and the 1-bit optimizers under a new worker count, whose state is
converted by a rule rather than exactly (``jaxspeed.checkpoint.layout``:
error feedback re-split, or reset when the tensor-parallel degree changes
too). The 1-bit runs compress from step ``--onebit_freeze_step``, save at
``--onebit_steps_before`` and go on for ``--gap_steps`` steps. Their (a)-(b)
difference (``onebit_layout_gap``) mixes the rule with the change of
optimizer trajectory that compressing over P' instead of P workers brings by
itself; the rule's own cost compares (a) with (c), a continuation on A from
the checkpoint with the rule applied: ``rule_gap``, the relative difference
of the mean loss over the gap steps (signed: negative when (c) is lower),
and ``rule_max_step_diff``, the largest per-step relative difference.

Summary: ``pairs``; ``max_rel_diff_exact`` (the pairs whose state converts
exactly; target <= 1e-4); ``onebit_conversion_gap`` (the largest |rule_gap|
of the re-split pairs; target <= 0.01); ``onebit_reset_gap`` (the same for
the pair whose errors reset); ``onebit_layout_gap``; ``restore_seconds_max``.
A process-count change (1 <-> 2 processes) is not in the matrix, which runs
in one process: ``tests/test_multiprocess.py`` resumes a one-process
pipelined run (8 devices) on two processes through ``experiments.launch_local``
without the pipeline (``pp2 dp2 tp2 zero1 -> dp2 fsdp2 tp2 zero3``), converting
the state on each, and checks the losses within 1e-5.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from experiments import common
from jaxspeed.checkpoint import Checkpointer
from jaxspeed.configs import gpt_tiny
from jaxspeed.errors import FlagError

QUICK = flags.DEFINE_bool("quick", False,
                          "Smoke run: 1 pair, 2 layers, 4 + 2 steps, a 4-step gap.")
STEPS_BEFORE = flags.DEFINE_integer("steps_before", 10, "Steps on layout A before the save.")
STEPS_AFTER = flags.DEFINE_integer("steps_after", 5, "Steps compared after the save.")
GAP_STEPS = flags.DEFINE_integer("gap_steps", 50, "Steps compared for the 1-bit pairs.")
ONEBIT_FREEZE_STEP = flags.DEFINE_integer(
    "onebit_freeze_step", 20, "1-bit pairs: warm-up steps before compression starts.")
ONEBIT_STEPS_BEFORE = flags.DEFINE_integer(
    "onebit_steps_before", 30, "1-bit pairs: steps on layout A before the save.")
ONLY = flags.DEFINE_string("only", None, "Run only the pairs whose name contains this.")


@dataclasses.dataclass(frozen=True)
class Pair:
  name: str
  a: dict  # parallel axes of layout A (with "zero" for the ZeRO stage, "devices" if not 8)
  b: dict
  model: str = "dense"  # or "moe"
  optimizer: str = "adamw"

  @property
  def exact(self) -> bool:
    """Whether the state converts exactly (the 1-bit per-worker rules do not)."""
    return not self.optimizer.startswith(("onebit", "zero_one"))

  @property
  def rule(self) -> str:
    """exact; or, for the 1-bit error feedback, resplit (same tensor-parallel blocks) or
    reset (``jaxspeed.checkpoint.layout``)."""
    if self.exact:
      return "exact"
    return "resplit" if self.a.get("tensor", 1) == self.b.get("tensor", 1) else "reset"


PAIRS = [
    Pair("dp8 -> dp4 tp2", {"data": 8}, {"data": 4, "tensor": 2}),
    Pair("dp8 zero1 -> dp2 fsdp4 zero3", {"data": 8, "zero": 1}, {"data": 2, "fsdp": 4, "zero": 3}),
    Pair("dp4 tp2 zero3 -> dp8 zero1", {"data": 4, "tensor": 2, "zero": 3},
         {"data": 8, "zero": 1}),
    Pair("dp8 zero2 -> dp4 sp2 zero2", {"data": 8, "zero": 2},
         {"data": 4, "sequence": 2, "zero": 2}),
    Pair("pp2 dp4 zero1 -> dp8", {"stage": 2, "data": 4, "zero": 1}, {"data": 8}),
    Pair("dp8 -> pp2 dp2 tp2", {"data": 8}, {"stage": 2, "data": 2, "tensor": 2}),
    Pair("pp2 dp4 -> pp4 dp2", {"stage": 2, "data": 4}, {"stage": 4, "data": 2}),
    Pair("dp8 (8 devices) -> dp4 (4 devices)", {"data": 8}, {"data": 4, "devices": 4}),
    Pair("moe ep4 dp2 -> ep2 dp4", {"expert": 4, "data": 2}, {"expert": 2, "data": 4}, "moe"),
    Pair("moe ep8 zero1 -> dp8 zero3", {"expert": 8, "zero": 1}, {"data": 8, "zero": 3}, "moe"),
    Pair("1-bit Adam dp8 -> dp4 (4 devices)", {"data": 8}, {"data": 4, "devices": 4},
         optimizer="onebit_adam"),
    Pair("0/1 Adam dp8 -> dp4 (4 devices)", {"data": 8}, {"data": 4, "devices": 4},
         optimizer="zero_one_adam"),
    Pair("1-bit Adam dp8 -> dp4 tp2", {"data": 8}, {"data": 4, "tensor": 2},
         optimizer="onebit_adam"),
]
# Quick: a 1-bit pair, which runs every path of run_pair (tests/test_layout_change.py
# resumes exact pairs and covers the other rules).
QUICK_PAIRS = ("1-bit Adam dp8 -> dp4 (4 devices)",)


def _config(pair: Pair, layout: dict, freeze_step: int, quick: bool):
  config = gpt_tiny.get_config()
  config.update(batch_size=16, seq_len=32, sample_tokens=0, fit_parallel=False)
  config.model.update(num_layers=2 if quick else 4, num_heads=2, d_model=32, d_ff=64,
                      max_seq_len=32)
  config.optim.update(name=pair.optimizer, warmup=2, decay=100_000)
  if pair.optimizer == "onebit_adam":  # a low rate: the compression phase starts early
    config.optim.update(freeze_step=freeze_step, learning_rate=1e-4)
  if pair.optimizer == "zero_one_adam":
    config.optim.update(var_freeze_step=freeze_step, learning_rate=1e-4)
  if pair.model == "moe":
    config.moe.update(num_experts=8, top_k=1, expert_interval=2, drop_tokens=False)
  config.microbatches = 2 if layout.get("stage", 1) > 1 else 1
  parallel = {k: v for k, v in layout.items() if k not in ("zero", "devices")}
  config.parallel.update({"data": 1, "fsdp": 1, "tensor": 1, "stage": 1, "expert": 1,
                          "sequence": 1, **parallel})
  config.zero.stage = layout.get("zero", 0)
  return config


def _train(setup, state, first: int, last: int):
  losses = []
  for step in range(first, last):
    state, metrics = setup.train_step(state, setup.to_device(setup.train_data.next_batch()), step)
    losses.append(float(metrics["loss"]))
  return losses, state


def run_pair(pair: Pair, steps_before: int, steps_after: int, directory: str,
             quick: bool = False, freeze_step: int = 1) -> dict:
  import jaxspeed

  shutil.rmtree(directory, ignore_errors=True)
  devices = lambda layout: jax.devices()[:layout.get("devices", 8)]
  setup_a = jaxspeed.build(_config(pair, pair.a, freeze_step, quick), devices=devices(pair.a))
  checkpointer = Checkpointer(directory)
  with jax.set_mesh(setup_a.mesh):
    _, state = _train(setup_a, setup_a.init_state(), 0, steps_before)
    checkpointer.save(steps_before, state, setup_a.train_data.state)
    checkpointer.close()
    unchanged, _ = _train(setup_a, state, steps_before, steps_before + steps_after)
  setup = jaxspeed.build(_config(pair, pair.b, freeze_step, quick), devices=devices(pair.b))
  checkpointer = Checkpointer(directory)
  with jax.set_mesh(setup.mesh):
    start = time.perf_counter()
    state, data = checkpointer.restore(steps_before, setup.abstract_state())
    jax.block_until_ready(state)
    restore_s = time.perf_counter() - start
    checkpointer.close()
    setup.train_data.restore(data)
    resumed, _ = _train(setup, state, steps_before, steps_before + steps_after)
  row = {"pair": pair.name, "model": pair.model, "optimizer": pair.optimizer,
         "exact": pair.exact, "rule": pair.rule, "steps_compared": steps_after,
         "max_rel_diff": _max_rel_diff(resumed, unchanged), "restore_s": restore_s,
         "loss_unchanged": unchanged[-1], "loss_resumed": resumed[-1]}
  if not pair.exact:
    # 1-bit compression over P' workers is another optimizer trajectory than over P, so (b)
    # differs from (a) even without a conversion. The rule's own cost: (c) continues on A
    # from the checkpoint with the rule applied as if P had changed.
    checkpointer = Checkpointer(directory)
    with jax.set_mesh(setup_a.mesh):
      state, data = checkpointer.restore(steps_before, setup_a.abstract_state())
      checkpointer.close()
      setup_a.train_data.restore(data)
      ruled, _ = _train(setup_a, _apply_worker_rule(state, pair.rule), steps_before,
                        steps_before + steps_after)
    row.update(rule_gap=float(np.mean(ruled) / np.mean(unchanged) - 1),
               rule_max_step_diff=_max_rel_diff(ruled, unchanged), loss_rule=ruled[-1])
  return row


def _max_rel_diff(losses: list[float], reference: list[float]) -> float:
  return float(np.max(np.abs(np.array(losses) - reference) / np.abs(np.array(reference))))


def _apply_worker_rule(state, rule: str):
  """The 1-bit worker-count rule on an unchanged layout (``jaxspeed.checkpoint.layout``):
  worker errors replaced by their mean (``resplit``; the server's are kept, as a re-split
  into as many chunks keeps them) or all errors zeroed (``reset``); per-worker momenta and
  accumulated updates replaced by their mean. One device per worker (no tensor blocks)."""
  def rule_on(state):
    opt = state.opt_state
    mean = lambda x: jnp.broadcast_to(jnp.mean(x, axis=0, keepdims=True), x.shape)
    errors = (jax.tree.map(jnp.zeros_like, opt.errors) if rule == "reset" else
              tuple(e._replace(worker=mean(e.worker)) for e in opt.errors))
    changed = {"errors": errors}
    if hasattr(opt, "accumulated"):  # 0/1 Adam
      changed.update(mu=jax.tree.map(mean, opt.mu),
                     accumulated=jax.tree.map(mean, opt.accumulated))
    return state.replace(opt_state=opt._replace(**changed))

  # One program: per-leaf eager collectives in flight at once can hang on CPU.
  return jax.jit(rule_on, out_shardings=jax.tree.map(lambda x: x.sharding, state))(state)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO
  common.setup_devices(8)
  quick = QUICK.value
  before, after, gap = (4, 2, 4) if quick else (STEPS_BEFORE.value, STEPS_AFTER.value,
                                                GAP_STEPS.value)
  freeze, onebit_before = (2, 4) if quick else (ONEBIT_FREEZE_STEP.value,
                                                ONEBIT_STEPS_BEFORE.value)
  if freeze >= onebit_before:
    raise FlagError("onebit_freeze_step", f"{freeze} must be below --onebit_steps_before="
                    f"{onebit_before}: the save must fall in the compression phase")
  pairs = [p for p in PAIRS if p.name in QUICK_PAIRS] if quick else PAIRS
  pairs = [p for p in pairs if ONLY.value is None or ONLY.value in p.name]
  if not pairs:
    raise FlagError("only", f"{ONLY.value!r} names no pair; pairs: {[p.name for p in PAIRS]}")
  out = os.path.join(common.OUTPUT_DIR.value, "universal_checkpoint")
  rows = [run_pair(pair, before, after, os.path.join(out, f"pair_{i}"), quick) if pair.exact
          else run_pair(pair, onebit_before, gap, os.path.join(out, f"pair_{i}"), quick, freeze)
          for i, pair in enumerate(pairs)]
  exact = [r["max_rel_diff"] for r in rows if r["exact"]]
  gaps = lambda rule: [abs(r["rule_gap"]) for r in rows if r["rule"] == rule]
  largest = lambda values: max(values) if values else float("nan")
  summary = {"pairs": len(rows),
             "max_rel_diff_exact": largest(exact),
             "onebit_conversion_gap": largest(gaps("resplit")),
             "onebit_reset_gap": largest(gaps("reset")),
             "onebit_layout_gap": largest([r["max_rel_diff"] for r in rows if not r["exact"]]),
             "restore_seconds_max": max(r["restore_s"] for r in rows)}
  common.write_results(
      "universal_checkpoint", summary, rows,
      {"quick": quick, "steps_before": before, "steps_after": after, "gap_steps": gap,
       "onebit_freeze_step": freeze, "onebit_steps_before": onebit_before,
       "model": "GPT 4 layers, d_model 32, seq 32, batch 16 (MoE: 8 experts every 2nd layer)"},
      header="Train on layout A, save, then continue on A and resume on B from the same "
             "checkpoint: the largest relative loss difference over the compared steps.")


if __name__ == "__main__":
  common.run_app(main)
