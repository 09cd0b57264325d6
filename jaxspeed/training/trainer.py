"""The training loop: validated config in, trained and checkpointed state out.

``build`` does everything that can fail on bad input (config, corpus,
tokenizer, mesh, shapes) before anything compiles; ``train`` runs the loop with
logging, evaluation, checkpointing and automatic resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxspeed.checkpoint import (
  Checkpointer,
  check_params_source,
  checkpoint_dir,
  flatten,
  has_checkpoint,
  load_params,
  restore_latest,
  save_run_config,
  saved_run_config,
  write_atomic,
)
from jaxspeed.comm import WorkerGroup
from jaxspeed.compression.qat import compression_from_config, matmul_shapes
from jaxspeed.config import validate
from jaxspeed.data import (
  BatchIterator,
  BpeTokenizer,
  MaskedLMBatches,
  Tokenizer,
  load_corpus,
  make_datasets,
  make_tokenizer,
  split_documents,
)
from jaxspeed.data_efficiency.batches import SampledBatches, SeqlenCurriculum
from jaxspeed.data_efficiency.sources import curriculum_source
from jaxspeed.errors import ConfigError, FlagError, RunError
from jaxspeed.inference import Generator, SamplingConfig
from jaxspeed.models import GPT, ModelConfig, PipelinedGPT, build_model
from jaxspeed.models.config import DTYPES
from jaxspeed.models.random_ltd import kept_length_at as kept_length_at_step
from jaxspeed.moe import MoeConfig
from jaxspeed.moe.mos import Distillation
from jaxspeed.optimizers import CommunicatingOptimizer, with_master_weights
from jaxspeed.optimizers.config import HOST_UPDATE_OPTIMIZERS
from jaxspeed.parallel import SEQUENCE_AXIS, compute_rules, make_mesh, pad_to_multiple
from jaxspeed.parallel.config import OFFLOAD_MEMORY_KINDS
from jaxspeed.parallel.devices import fit_config_layout, peak_flops
from jaxspeed.parallel.pipeline import unstack_layers
from jaxspeed.training.adversarial import embedding_noise
from jaxspeed.training.evaluation import validation_bits_per_byte
from jaxspeed.training.metrics import MetricsWriter, plot_loss, read_metrics
from jaxspeed.training.optim import make_optimizer, make_schedule
from jaxspeed.training.preemption import Preemption, first_message
from jaxspeed.training.state import (
  StateSpecs,
  TrainState,
  abstract_params,
  abstract_state,
  bytes_per_device,
  init_state,
  state_specs,
  tensor_parallel_specs,
)
from jaxspeed.training.step import (
  KnowledgeDistillation,
  LanguageModeling,
  LayerDropping,
  StepOptions,
  TrainStep,
  all_finite,
  batch_sharding,
  make_eval_step,
  make_train_step,
)

# The event jax.monitoring reports for each XLA compilation (jax/_src/dispatch.py).
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built and validated; nothing compiled yet."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  model_config: ModelConfig
  model: nn.Module
  optimizer: optax.GradientTransformation | CommunicatingOptimizer
  specs: StateSpecs
  train_step: TrainStep
  eval_step: Any
  tokenizer: Tokenizer
  train_data: BatchIterator | MaskedLMBatches | SeqlenCurriculum | SampledBatches
  val_data: BatchIterator | MaskedLMBatches

  def init_state(self, params: Any = None) -> TrainState:
    """A fresh state; with ``params`` (placed as ``abstract_state().params``), those."""
    return init_state(self.model, self.optimizer, _model_input(self.config), self.mesh,
                      self.specs, self.config.seed, params)

  def abstract_state(self) -> TrainState:
    return abstract_state(self.model, self.optimizer, _model_input(self.config), self.mesh,
                          self.specs)

  def to_device(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global batch array per key.

    With ``sequence_parallel.pad``, sequences are first right-padded to a
    multiple of the ``sequence`` axis.
    """
    if self.config.sequence_parallel.pad:
      local_batch = pad_to_multiple(local_batch, self.mesh.shape[SEQUENCE_AXIS])
    sharding = batch_sharding(self.mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in local_batch.items()}


def _model_input(config: ml_collections.ConfigDict) -> jax.ShapeDtypeStruct:
  """The token shape parameters are initialized from (they do not depend on the batch)."""
  return jax.ShapeDtypeStruct((1, config.seq_len), np.int32)


def run_documents(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """``config.data.corpus`` split into (train, validation) documents."""
  try:
    docs = load_corpus(config.data.corpus, config.data.jsonl_field)
  except FileNotFoundError as e:
    raise ConfigError("data.corpus", str(e)) from e
  return split_documents(docs, config.data.val_fraction, config.seed)


def run_tokenizer(config: ml_collections.ConfigDict, docs: list[str],
               workdir: str | None) -> Tokenizer:
  """Byte tokenizer, or a BPE trained on the train split (reused on resume)."""
  path = os.path.join(workdir, "tokenizer.json") if workdir else None
  if config.data.tokenizer == "bpe" and path and os.path.exists(path):
    return BpeTokenizer.load(path)
  tokenizer = make_tokenizer(config.data.tokenizer, docs, config.data.bpe_vocab_size)
  if isinstance(tokenizer, BpeTokenizer) and path and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(path)
  return tokenizer


def layer_dropping(config: ml_collections.ConfigDict) -> LayerDropping:
  """Random-LTD's kept-length schedule and PLD's parameters from ``config.data_efficiency``."""
  ltd, pld = config.data_efficiency.random_ltd, config.data_efficiency.pld
  kept_length_at = None
  if ltd.enabled:
    kept_length_at = functools.partial(
        kept_length_at_step, min_value=ltd.min_value, max_value=ltd.max_value or config.seq_len,
        require_steps=ltd.require_steps, seq_per_step=ltd.seq_per_step)
  return LayerDropping(kept_length_at, (pld.theta, pld.gamma) if pld.enabled else None,
                       config.model.num_layers)


def _schedule_length(config: ml_collections.ConfigDict, train_data,
                     dropping: LayerDropping) -> int:
  """The run's length in ``optim.lr_unit``: steps, or the tokens / layer-tokens it will see."""
  if config.optim.lr_unit == "steps":
    return config.steps
  total = 0
  for step in range(config.steps):
    rows, length = (train_data.shape_at(step, config.batch_size, config.seq_len)
                    if isinstance(train_data, SeqlenCurriculum)
                    else (config.batch_size, config.seq_len))
    total += (rows * length if config.optim.lr_unit == "tokens"
              else dropping.layer_tokens(dropping.kept_length_at(step), rows, length))
  return total


def build(config: ml_collections.ConfigDict, workdir: str | None = None,
          devices=None) -> Setup:
  """Validates ``config`` and builds mesh, data, model, optimizer and steps.

  Raises:
    ConfigError: for any bad value, before anything compiles.
  """
  devices = jax.devices() if devices is None else devices
  fit_config_layout(config, devices)
  validate(config, len(devices))
  train_docs, val_docs = run_documents(config)
  tokenizer = run_tokenizer(config, train_docs, workdir)
  # BERT's [MASK] is the first id past the tokenizer's vocabulary.
  needed = tokenizer.vocab_size + (config.model.name == "bert")
  if needed > config.model.vocab_size:
    raise ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller than the "
                      f"{needed} ids needed (tokenizer vocabulary {tokenizer.vocab_size}"
                      f"{' + [MASK]' if config.model.name == 'bert' else ''})")
  train_data, val_data = make_datasets(
      train_docs, val_docs, tokenizer, config.seq_len, config.batch_size, config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  if config.model.name == "bert":  # the curricula are GPT-only (compatibility table)
    train_data, val_data = (MaskedLMBatches(d, tokenizer.vocab_size)
                            for d in (train_data, val_data))
  else:
    train_data = curriculum_source(config, train_data, workdir, jax.process_index(),
                                   jax.process_count())

  mesh = make_mesh(config.parallel, devices)
  num_stages = mesh.shape["stage"]
  hpz = config.zero.hpz_partition_size
  if hpz > 1 and hpz != mesh.shape["fsdp"]:
    raise ConfigError("zero.hpz_partition_size", f"{hpz} must be the devices of a node, the "
                      f"fsdp axis ({mesh.shape['fsdp']} here; data runs across nodes); "
                      f"allowed: 1, {mesh.shape['fsdp']}")
  adversarial = embedding_noise(config.optim.adversarial)
  offload = config.zero.offload_optimizer != "none"
  host_update = offload and config.optim.name in HOST_UPDATE_OPTIMIZERS
  # ZeRO-Offload streams gradients to the host as the backward pass makes them; a
  # pipeline's stages hand theirs over at the end of the schedule instead.
  stream_gradients = host_update and num_stages == 1
  model_config = dataclasses.replace(
      ModelConfig.from_config(config.model, MoeConfig.from_config(config.moe)),
      params_on_host=config.zero.offload_params != "none" or stream_gradients)
  # With a pipeline, config.microbatches are its microbatches (as DeepSpeed's
  # gradient_accumulation_steps in PipelineEngine), not a sequential accumulation.
  pipeline = config.pipeline
  model = build_model(config.model.name, model_config, num_stages, config.microbatches,
                      pipeline.schedule,
                      pipeline.virtual_stages if pipeline.schedule == "interleaved" else 1)
  group = WorkerGroup.on_mesh(mesh, tensor_parallel_specs(model, _model_input(config)))
  optimizer = make_optimizer(config.optim, group)
  if model_config.param_dtype != "float32":  # the compatibility table keeps out the 1-bit family
    optimizer = with_master_weights(optimizer, DTYPES[model_config.param_dtype])
  dropping = layer_dropping(config)
  total = _schedule_length(config, train_data, dropping)
  if config.optim.lr_unit != "steps" and total >= 2**31:
    raise ConfigError("optim.lr_unit", f"{config.optim.lr_unit} counts up to {total} overflow "
                      "the int32 counter; use 'steps'")
  specs = state_specs(model, optimizer, _model_input(config), mesh, config.zero.stage,
                      OFFLOAD_MEMORY_KINDS[config.zero.offload_optimizer],
                      host_update=host_update,
                      block_params_memory_kind=OFFLOAD_MEMORY_KINDS[config.zero.offload_params],
                      stream_gradients=stream_gradients)
  compression = compression_from_config(config.compression, matmul_shapes(
      lambda p, x: model.apply({"params": p}, x), abstract_params(model, _model_input(config)),
      _model_input(config)))
  options = StepOptions(
      train_objective(config, devices), microbatches=config.microbatches if num_stages == 1 else 1,
      grad_clip=config.optim.grad_clip, lr_unit=config.optim.lr_unit,
      deterministic=config.model.dropout == 0, layer_dropping=dropping,
      dense_interceptor=compression, quantized_weights=config.zero.quantized_weights,
      hierarchical_partition=hpz > 1, quantized_gradients=config.zero.quantized_gradients,
      speculate=config.zero.offload_speculation, reduce_scatter=config.zero.reduce_scatter,
      expert_bias_rate=MoeConfig.from_config(config.moe).bias_rate, adversarial=adversarial)
  train_step = make_train_step(model, optimizer, make_schedule(config.optim, total), specs, mesh,
                               options)
  eval_step = make_eval_step(model, specs, mesh, compression)
  return Setup(config, mesh, model_config, model, optimizer, specs, train_step, eval_step,
               tokenizer, train_data, val_data)


def train_objective(config: ml_collections.ConfigDict, devices=None
              ) -> LanguageModeling | KnowledgeDistillation:
  """The language-model objective, distilling from ``kd``'s teacher when ``kd.enabled`` (MoS)."""
  aux_loss_coef = MoeConfig.from_config(config.moe).loss_coef
  if not config.kd.enabled:
    return LanguageModeling(aux_loss_coef)
  kd = config.kd
  return KnowledgeDistillation(TeacherLogits(config, devices),
                               Distillation(kd.temperature, kd.alpha_ce, kd.beta_ce),
                               aux_loss_coef, kd.stop_step)


class TeacherLogits:
  """``teacher(inputs [B, S]) -> logits [B, S, V]`` of the MoS teacher (``load_teacher``).

  The teacher is restored on the first call (under the student's mesh), so
  building a student for evaluation or generation does not need it.
  """

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    self._config, self._devices = config, devices
    self._forward = None

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if self._forward is None:
      self._forward = load_teacher(self._config, self._devices)
    return self._forward(inputs)


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The MoS teacher's config: the student's, with ``kd``'s teacher depth and experts."""
  teacher = ml_collections.ConfigDict(config.to_dict())
  teacher.kd.enabled = False
  if config.kd.num_layers_teacher:
    teacher.model.num_layers = config.kd.num_layers_teacher
  if config.kd.num_experts_teacher:
    teacher.moe.layer_num_experts = tuple(config.kd.num_experts_teacher)
  return teacher


def load_teacher(config: ml_collections.ConfigDict, devices=None):
  """``teacher(inputs [B, S]) -> logits [B, S, V]`` from the newest ``kd.teacher_workdir`` step.

  Call under the student's mesh (``jax.set_mesh``); the teacher uses the same one.
  """
  setup = build(teacher_config(config), devices=devices)
  params = restore_latest(config.kd.teacher_workdir, setup.abstract_state(),
                          key="kd.teacher_workdir").params

  def forward(params, inputs):
    with nn.logical_axis_rules(compute_rules()):
      return setup.model.apply({"params": params}, inputs)

  forward = jax.jit(forward, out_shardings=batch_sharding(setup.mesh))
  return lambda inputs: forward(params, inputs)


def evaluate(setup: Setup, params) -> float:
  """Mean validation loss over the first ``config.eval_batches`` validation batches."""
  loss_sum, count = 0.0, 0.0
  for i in range(setup.config.eval_batches):
    s, n = setup.eval_step(params, setup.to_device(setup.val_data.batch_at(i)))
    loss_sum, count = loss_sum + float(s), count + float(n)
  return loss_sum / count


def _summary_table(summary: dict[str, Any]) -> str:
  rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
          for k, v in summary.items()]
  return "\n".join(["| metric | value |", "|---|---|", *rows])


# ---------------------------------------------------------------------------
# Run safety: the workdir, resuming, the end of a run, divergence, failed saves.

SUMMARY_FILE = "summary.json"

# Config keys a resume may change: how the run is laid out on devices, how long it runs
# and what it reports. Any other key changes the model, the optimizer or the data stream,
# so the checkpoints would not fit it. A trailing dot matches a whole section.
RESUMABLE_KEYS = ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                  "keep_checkpoints", "max_consecutive_skips", "peak_flops", "fit_parallel",
                  "sample_tokens", "sample_prompt", "microbatches", "parallel.", "pipeline.",
                  "zero.", "sequence_parallel.", "model.remat", "model.attention", "inference.",
                  "rlhf.", "init_params_from")


def check_workdir(workdir: str) -> None:
  """Creates ``workdir`` if needed; raises ``FlagError`` unless it is a writable directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise FlagError("workdir", f"{workdir} is a file, not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise FlagError("workdir", f"cannot write to {workdir}: {e.strerror or e}") from e


def check_resume_compatible(saved: dict[str, Any], requested: ml_collections.ConfigDict
                            ) -> list[str]:
  """Compares a resumed run's saved (flattened) config with the requested one.

  Keys missing on either side (a schema change) are not compared.

  Returns:
    ``"key: old -> new"`` for each change a resume honours (``RESUMABLE_KEYS``).

  Raises:
    ConfigError: naming every other key that differs.
  """
  # Through JSON, so that tuples compare equal to the saved lists.
  wanted = flatten(json.loads(requested.to_json()))
  changed = sorted(k for k in saved.keys() & wanted.keys() if saved[k] != wanted[k])
  resumable = lambda key: any(key == k or (k.endswith(".") and key.startswith(k))
                              for k in RESUMABLE_KEYS)
  refused = [k for k in changed if not resumable(k)]
  if refused:
    diffs = "; ".join(f"{k}: saved {saved[k]!r}, requested {wanted[k]!r}" for k in refused)
    raise ConfigError(", ".join(refused), f"differs from the run being resumed ({diffs}). A "
                      "resume may change only the mesh (parallel.*, pipeline.*), zero.*, steps, "
                      "intervals and reporting; start a new run in another --workdir, or "
                      "delete this one")
  return [f"{k}: {saved[k]!r} -> {wanted[k]!r}" for k in changed]


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The summary a finished run saved in ``workdir``, or None."""
  try:
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _finished_run(config: ml_collections.ConfigDict, workdir: str, latest: int,
                  lead: bool) -> dict[str, Any]:
  """What a run whose newest checkpoint is at or past ``config.steps`` does: nothing."""
  if latest > config.steps:
    raise ConfigError("steps", f"{config.steps} is below the newest checkpoint (step {latest}) "
                      f"in {workdir}, so there is nothing to train; raise steps above {latest}"
                      " to train on, or start fresh in a new --workdir")
  summary = read_summary(workdir) or {"steps": latest}
  if lead:
    print(f"the run in {workdir} is complete (step {latest} of {config.steps}); raise "
          "--config.steps to train on, or use a new --workdir to start fresh", flush=True)
    print(_summary_table({k: v for k, v in summary.items() if k != "sample"}), flush=True)
  return summary


class SkipWatch:
  """Stops a run after ``limit`` consecutive skipped (non-finite) steps.

  Fed the running total ``state.skipped`` after each step; a step counts as
  skipped when that total grew. A run shorter than ``limit`` whose every step
  was skipped fails at its end instead (``check_trained``).
  """

  def __init__(self, limit: int, done: int, skipped: int):
    self.limit, self.done, self.skipped, self.consecutive = limit, done, skipped, 0

  def update(self, done: int, skipped: int) -> None:
    """Raises ``RunError`` once ``limit`` steps in a row up to step ``done`` were skipped."""
    if done <= self.done:
      return
    new = skipped - self.skipped
    self.consecutive = self.consecutive + new if new == done - self.done else new
    self.done, self.skipped = done, skipped
    if self.consecutive >= self.limit:
      raise RunError(f"stopped at step {done}: the last {self.consecutive} steps were skipped "
                     "because the loss, gradients or update were not finite "
                     f"(max_consecutive_skips={self.limit}); parameters and checkpoints keep "
                     "the last finite values. Lower optim.learning_rate or check the data")

  def check_trained(self, first_step: int) -> None:
    """Raises ``RunError`` if every step after ``first_step`` was skipped: nothing trained."""
    if self.done > first_step and self.consecutive >= self.done - first_step:
      raise RunError(f"every step from {first_step + 1} to {self.done} was skipped because the "
                     "loss, gradients or update were not finite, so nothing was trained. "
                     "Lower optim.learning_rate or check the data")


@contextlib.contextmanager
def _save_errors(directory: str):
  """Turns a failed (possibly earlier, asynchronous) checkpoint save into one ``RunError``.

  With several processes the message names this one: every process stops with it.
  """
  try:
    yield
  except Exception as e:
    first = (str(e).strip().splitlines() or [""])[0]
    where = f" on process {jax.process_index()}" if jax.process_count() > 1 else ""
    raise RunError(f"saving a checkpoint in {directory} failed{where} ({type(e).__name__}: "
                   f"{first}); the run stopped. Free space or fix the directory, then rerun to "
                   "resume from the newest complete checkpoint") from e


class SaveFailed(RunError):
  """A checkpoint save failed on some process; every process raises it at the same step.

  With several processes, orbax's background threads of that save on the other
  processes wait at a barrier for the failed one until orbax's timeout (10
  minutes): nothing should wait for them, and a command-line run ends its
  process without joining them (``experiments.train``).
  """


def _failed_save(checkpointer: Checkpointer, directory: str) -> RunError | None:
  """The error of a finished asynchronous save that failed (``_save_errors``), else None."""
  try:
    with _save_errors(directory):
      checkpointer.check()
  except RunError as e:
    return e
  return None


def _wait_for_saves(checkpointer: Checkpointer, directory: str, preemption: Preemption) -> None:
  """With several processes: waits until the pending save is done on all, or raises.

  Raises ``SaveFailed`` on every process at once when one's write failed. Orbax
  alone (its next save, or ``close``) would wait at a barrier for the failed
  process until its timeout. With one process orbax's own wait reports the error.
  """
  if jax.process_count() == 1:
    return
  while True:
    error = _failed_save(checkpointer, directory)
    failed, saving = preemption.any_process([error is not None, checkpointer.saving()])
    if failed:
      raise SaveFailed(first_message(str(error) if error else None)) from error
    if not saving:
      return
    time.sleep(0.05)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains per ``config``, resuming from the newest checkpoint in ``workdir``.

  A resume must keep the model, optimizer and data settings (``check_resume_compatible``);
  a run whose newest checkpoint is at ``config.steps`` only prints its saved summary.

  SIGTERM or SIGINT stops the run at the next step boundary with a committed
  checkpoint (``Preemption``); a second one ends the process at once.

  Returns:
    The run summary (also printed as a table by process 0, and saved as ``summary.json``);
    for a run stopped by a signal, ``{"preempted": True, "steps_done": N, ...}`` only.

  Raises:
    ConfigError, FlagError: bad config or workdir, before anything compiles.
    RunError: the run diverged (``max_consecutive_skips``) or a checkpoint failed to save.
  """
  lead = jax.process_index() == 0
  validate(config, jax.device_count())
  check_workdir(workdir)
  if config.kd.enabled and not has_checkpoint(config.kd.teacher_workdir):
    # The teacher is restored at the first distilled step; a missing one must stop the run
    # before anything compiles.
    raise ConfigError("kd.teacher_workdir", f"no checkpoint in "
                      f"{checkpoint_dir(config.kd.teacher_workdir)}")
  if config.init_params_from and not has_checkpoint(workdir):
    check_params_source(config.init_params_from)
  checkpointer = Checkpointer(checkpoint_dir(workdir), keep=config.keep_checkpoints)
  try:
    start = checkpointer.latest_step()
    if start is not None:
      saved = saved_run_config(workdir)
      changes = check_resume_compatible(saved, config) if saved is not None else []
      if start >= config.steps:
        checkpointer.close()
        return _finished_run(config, workdir, start, lead)
      if lead and changes:
        print(f"resuming {workdir} with changes: {'; '.join(changes)}", flush=True)
    with Preemption() as preemption:
      summary, sample = _train(config, workdir, checkpointer, start, lead, preemption)
  except SaveFailed:
    if jax.process_count() == 1:  # else the wait would last until orbax's barrier timeout
      with contextlib.suppress(Exception):
        checkpointer.close()
    raise
  except BaseException:
    with contextlib.suppress(Exception):  # a pending save's own failure is secondary
      checkpointer.close()
    raise
  if summary.get("preempted"):  # not complete: no summary.json, which would say it was
    return summary
  if lead:
    write_atomic(os.path.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=2, default=str))
    print(_summary_table(summary))
    if sample is not None:
      print(f"\nsample: {sample!r}")
  if sample is not None:
    summary["sample"] = sample
  return summary


def _preempted_summary(config: ml_collections.ConfigDict, done: int, preemption: Preemption,
                       state: TrainState, directory: str, loop_s: float) -> dict[str, Any]:
  """What a run stopped by a signal at step ``done`` reports: where to resume, not results."""
  received = preemption.signal.name if preemption.signal else "another process's signal"
  return {"preempted": True, "signal": received, "steps_done": done, "steps": config.steps,
          "skipped_steps": int(state.skipped), "tokens_seen": int(state.tokens),
          "loop_s": loop_s, "checkpoint": os.path.join(directory, str(done))}


def _train(config: ml_collections.ConfigDict, workdir: str, checkpointer: Checkpointer,
           start: int | None, lead: bool, preemption: Preemption
           ) -> tuple[dict[str, Any], str | None]:
  """The training loop of ``train``: (summary, text sample or None).

  Stops early, saved, at the first step boundary ``preemption`` asks for, and with an
  error at the first one where a process reports a failed asynchronous save.
  """
  setup = build(config, workdir)
  directory = checkpoint_dir(workdir)
  with jax.set_mesh(setup.mesh):
    if start is None and config.init_params_from:
      # In float32: a master copy of low-precision parameters starts from these.
      target = jax.tree.map(lambda x: x.update(dtype=np.float32), setup.abstract_state().params)
      params, source_step = load_params(config.init_params_from, target)
      state = setup.init_state(params)
      if lead:
        print(f"initialized the parameters from {config.init_params_from} (its step "
              f"{source_step}); the optimizer starts fresh", flush=True)
    elif start is None:
      state = setup.init_state()
    else:
      try:
        state, data_state = checkpointer.restore(start, setup.abstract_state())
      except Exception as e:  # orbax raises many kinds; one line is enough
        first = (str(e).strip().splitlines() or [""])[0]
        raise RunError(f"cannot restore step {start} from {directory} into this config "
                       f"({type(e).__name__}: {first})") from e
      setup.train_data.restore(data_state)
      if lead:
        print(f"resumed from step {start} in {workdir}", flush=True)
    if lead:  # only now: a failed restore must leave the run's config.json as it was
      save_run_config(config, workdir)
    first_step = int(state.step)

    writer = MetricsWriter(workdir, config.steps, first_step, enabled=lead)
    flops_per_token = setup.model_config.flops_per_token(config.seq_len)
    peak, peak_from = peak_flops(config.peak_flops, config.model.dtype, setup.mesh.devices.ravel())
    mfu = lambda tokens_per_s: tokens_per_s * flops_per_token / peak
    val_losses: list[float] = []
    if first_step == 0:  # the untrained model's loss, so the curve shows what training did
      val_losses.append(evaluate(setup, state.params))
      if lead:
        print(f"step 0: val_loss={val_losses[0]:.4g}", flush=True)
    throughput: list[float] = []
    window_start, window_tokens, window_first = time.perf_counter(), 0, True
    metrics: dict[str, jax.Array] = {}
    skips = SkipWatch(config.max_consecutive_skips, first_step, int(state.skipped))
    compile_s = [0.0]
    on_compile = lambda event, seconds, **_: compile_s.__setitem__(
        0, compile_s[0] + seconds * (event == BACKEND_COMPILE_EVENT))
    jax.monitoring.register_event_duration_secs_listener(on_compile)
    loop_start = time.perf_counter()
    preempted_at = None
    save_error: RunError | None = None  # this process's failed save, until all processes agree
    try:
      for step in range(first_step, config.steps):
        batch = setup.to_device(setup.train_data.next_batch())
        previous = metrics
        state, metrics = setup.train_step(state, batch, step)
        if previous:  # one step late, so the host does not wait for the step just dispatched
          skips.update(step, int(previous["skipped_steps"]))
        # A failed background save stops the run at the next step boundary. With several
        # processes each could see the save end a step apart, and one stopping alone would
        # leave the others waiting in a collective: all stop where they agree it failed,
        # with the error of the first process whose save failed.
        save_error = save_error or _failed_save(checkpointer, directory)
        window_tokens += batch["inputs"].size
        done = step + 1
        agreed = preemption.at_boundary(save_failed=save_error is not None)
        if agreed.save_failed:
          jax.block_until_ready(state)  # only first_message's collective in flight
          raise SaveFailed(first_message(str(save_error) if save_error else None)) from save_error
        stop = agreed.preempted and done < config.steps
        writer.advance()
        evaluate_now = done % config.eval_every == 0 or done == config.steps
        if evaluate_now or done % config.log_every == 0:
          record = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
                    for k, v in metrics.items()}
          elapsed = time.perf_counter() - window_start
          tokens_per_s = window_tokens / elapsed
          if not window_first:  # the first window includes compilation
            throughput.append(tokens_per_s)
          record.update(perplexity=math.exp(min(record["loss"], 50.0)),
                        tokens_per_s=tokens_per_s, mfu=mfu(tokens_per_s),
                        tokens_seen=int(state.tokens),
                        elapsed_s=time.perf_counter() - loop_start)
          if evaluate_now:
            val_losses.append(evaluate(setup, state.params))
            record["val_loss"] = val_losses[-1]
          writer.write(done, record)
          window_start, window_tokens, window_first = time.perf_counter(), 0, False
        if done % config.checkpoint_every == 0 or done == config.steps or stop:
          skips.update(done, int(metrics["skipped_steps"]))
          if done == config.steps:
            skips.check_trained(first_step)
          # The guard keeps the parameters finite; never save them otherwise.
          if not bool(all_finite(state.params)):
            raise RunError(f"stopped at step {done}: the parameters are not finite; no "
                           "checkpoint was written")
          _wait_for_saves(checkpointer, directory, preemption)
          with _save_errors(directory):
            checkpointer.save(done, state, setup.train_data.state)
        if stop:
          preempted_at = done
          break
      loop_s = time.perf_counter() - loop_start
      _wait_for_saves(checkpointer, directory, preemption)
      with _save_errors(directory):
        checkpointer.close()
    finally:
      jax.monitoring.unregister_event_duration_listener(on_compile)
      writer.close()
    if preempted_at is not None:
      if lead:
        print(f"preempted: saved step {preempted_at} in {directory}; rerun the same command to "
              "resume", flush=True)
      return _preempted_summary(config, preempted_at, preemption, state, directory,
                                loop_s), None

    summary: dict[str, Any] = {
        "steps": config.steps,
        "final_loss": float(metrics["loss"]) if metrics else float("nan"),
        "initial_val_loss": val_losses[0] if first_step == 0 else float("nan"),
        "val_loss": val_losses[-1] if val_losses else float("nan"),
        "tokens_per_s": float(np.median(throughput)) if throughput else float("nan"),
        "skipped_steps": int(state.skipped),
        "tokens_seen": int(state.tokens),
        "loop_s": loop_s,
        "compile_s": compile_s[0],
        "train_step_compilations": setup.train_step.compilations,
        "mesh": " ".join(f"{k}={v}" for k, v in setup.mesh.shape.items() if v > 1) or "1 device",
        "zero_stage": config.zero.stage,
        "offload_optimizer": config.zero.offload_optimizer,
        "offload_params": config.zero.offload_params,
        "param_dtype": config.model.param_dtype,
        **{f"state_{kind}_bytes_per_device": n for kind, n in bytes_per_device(state).items()},
        "checkpoint": os.path.join(directory, str(config.steps)),
    }
    summary["mfu"] = mfu(summary["tokens_per_s"])
    summary.update(peak_flops=peak, peak_flops_from=peak_from)
    if config.model.name == "gpt":
      summary["val_bits_per_byte"] = validation_bits_per_byte(
          setup.tokenizer, map(setup.val_data.batch_at, range(config.eval_batches)),
          summary["val_loss"])
    if lead and os.path.exists(writer.path):
      plot_loss(read_metrics(writer.path), os.path.join(workdir, "loss.png"))
    sample = None
    if config.sample_tokens and config.model.name == "gpt":
      prompt = [int(t) for t in setup.tokenizer.encode(config.sample_prompt)]
      model, params = setup.model, state.params
      if isinstance(model, PipelinedGPT):  # generation runs the plain GPT on the same layers
        # One program for the whole tree: per-leaf eager ops across processes can hang.
        model, params = GPT(model.config), jax.jit(unstack_layers)(params)
      generator = Generator(model, params, cache_len=config.seq_len, mesh=setup.mesh)
      ids = generator.generate([prompt], config.sample_tokens, seed=config.seed,
                               sampling=SamplingConfig(temperature=0.8))[0]
      sample = config.sample_prompt + setup.tokenizer.decode(ids)
  return summary, sample
