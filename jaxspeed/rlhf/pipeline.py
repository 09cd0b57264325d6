"""The RLHF steps from one config, each starting from the previous step's checkpoint.

``pretrain`` -> ``sft`` -> ``reward`` -> ``ppo`` (DeepSpeed-Chat's steps 1-3),
and ``dpo`` / ``grpo`` as alternative third steps. Step ``s`` writes
``<workdir>/<s>/checkpoints`` and ``<workdir>/<s>/stage.json`` (what the
checkpoint holds: the step, whether it has a value head, the tokenizer's
fingerprint), so any step runs alone once its inputs exist, and loading the
wrong model fails with an error naming the key that pointed to it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxspeed.checkpoint import Checkpointer, checkpoint_dir, restore_latest
from jaxspeed.config import validate_rlhf
from jaxspeed.data import BpeTokenizer, Tokenizer
from jaxspeed.errors import ConfigError
from jaxspeed.inference import SamplingConfig
from jaxspeed.models import GPT, ModelConfig
from jaxspeed.parallel import make_mesh
from jaxspeed.parallel.mesh import DATA_AXES
from jaxspeed.rlhf.data import PreferencePairs, continuation_pairs
from jaxspeed.rlhf.dpo import dpo_batch, dpo_loss_sum, make_reference_logprobs
from jaxspeed.rlhf.grpo import GrpoTrainer, grpo_loss_sum
from jaxspeed.rlhf.hybrid_engine import HybridEngine
from jaxspeed.rlhf.learner import Learner, fit, make_learner, step_optim
from jaxspeed.rlhf.ppo import PTX_INPUTS, PTX_TARGETS, PpoTrainer, actor_loss_sum, critic_loss_sum
from jaxspeed.rlhf.reward import make_scorer, pairwise_accuracy, reward_batch, reward_loss_sum
from jaxspeed.rlhf.sft import sft_batch
from jaxspeed.rlhf.value_model import ValueModel, value_params_from_lm
from jaxspeed.training.state import TrainState
from jaxspeed.training.step import batch_sharding, make_eval_step
from jaxspeed.training.trainer import run_documents, run_tokenizer, train

STAGE_FILE = "stage.json"
# The config key naming each step's input directory ("" = the step's folder in workdir).
INPUT_KEYS = {"pretrain": "init_workdir", "sft": "actor_workdir", "reward": "reward_workdir"}


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
  """Equal for tokenizers that map text to the same ids."""
  if isinstance(tokenizer, BpeTokenizer):
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    return f"bpe-{tokenizer.vocab_size}-{hashlib.sha1(vocab).hexdigest()[:16]}"
  return f"{type(tokenizer).__name__}-{tokenizer.vocab_size}"


def input_dir(config: ml_collections.ConfigDict, workdir: str, stage: str) -> str:
  """Where a step's output is read from: its ``rlhf.*_workdir`` key, else ``<workdir>/<stage>``."""
  key = INPUT_KEYS.get(stage)
  return (key and config.rlhf[key]) or os.path.join(workdir, stage)


@dataclasses.dataclass
class Context:
  """What every step shares: the config, mesh, tokenizer, models and preference task."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  tokenizer: Tokenizer
  actor_model: GPT
  value_model: ValueModel
  train_pairs: PreferencePairs
  eval_pairs: PreferencePairs
  _engine: HybridEngine | None = dataclasses.field(default=None, repr=False)

  @property
  def seq_len(self) -> int:
    return self.config.rlhf.prompt_len + self.config.rlhf.answer_len

  def input_dir(self, stage: str) -> str:
    return input_dir(self.config, self.workdir, stage)

  def output_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)

  @functools.cached_property
  def scorer(self):
    """``score(reward params, tokens, mask) -> [B]``, compiled once per run."""
    return make_scorer(self.value_model, self.mesh)

  def engine(self, params) -> HybridEngine:
    """The actor's hybrid engine, built from ``params`` on first use.

    One per run, so its generation programs compile once for every step;
    ``HybridEngine.generate`` takes the parameters to generate from.
    """
    if self._engine is None:
      self._engine = HybridEngine(self.actor_model, params, self.mesh, self.seq_len)
    return self._engine

  def learner(self, value_head: bool, optim, steps: int, loss_sum=None) -> Learner:
    model = self.value_model if value_head else self.actor_model
    return make_learner(model, optim, steps, self.mesh, self.config.zero.stage, self.seq_len,
                        loss_sum, self.config.microbatches)


def make_context(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Context:
  """Validates ``config`` (``validate_rlhf``) and builds the task; nothing compiles.

  The tokenizer is the pretrained model's (a BPE is trained once and saved beside it).
  """
  devices = jax.devices() if devices is None else devices
  validate_rlhf(config, len(devices))
  train_docs, val_docs = run_documents(config)
  tokenizer = run_tokenizer(config, train_docs, input_dir(config, workdir, "pretrain"))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller than the "
                      f"tokenizer's {tokenizer.vocab_size} ids")
  rlhf = config.rlhf
  kinds = tuple(k.strip() for k in rlhf.rejected.split(",") if k.strip())
  model_config = ModelConfig.from_config(config.model)
  mesh = make_mesh(config.parallel, devices)
  eval_pairs = continuation_pairs(val_docs, tokenizer, rlhf.prompt_len, rlhf.answer_len,
                                  rlhf.eval_pairs, config.seed + 1, kinds)
  # Held-out rows are evaluated in one batch split over the data axes.
  data_size = math.prod(mesh.shape[a] for a in DATA_AXES)
  eval_pairs = eval_pairs.take(np.arange(len(eval_pairs) // data_size * data_size))
  if not len(eval_pairs):
    raise ConfigError("rlhf.eval_pairs", f"no held-out pairs: need at least {data_size} (the "
                      "data-parallel size)")
  return Context(
      config, workdir, mesh, tokenizer, GPT(model_config), ValueModel(model_config),
      train_pairs=continuation_pairs(train_docs, tokenizer, rlhf.prompt_len, rlhf.answer_len,
                                     rlhf.num_pairs, config.seed, kinds),
      eval_pairs=eval_pairs)


# -- checkpoints of the steps ---------------------------------------------------------------


def save_stage(context: Context, stage: str, state: TrainState, value_head: bool,
               summary: dict[str, Any]) -> None:
  """Writes the step's final state, then ``stage.json`` (so a half-written step has none).

  A rerun replaces the step's earlier output.
  """
  directory = context.output_dir(stage)
  os.makedirs(directory, exist_ok=True)
  meta_path = os.path.join(directory, STAGE_FILE)
  if jax.process_index() == 0 and os.path.exists(meta_path):
    os.remove(meta_path)
  if stage != "pretrain":  # the trainer has checkpointed it
    shutil.rmtree(checkpoint_dir(directory), ignore_errors=True)
    checkpointer = Checkpointer(checkpoint_dir(directory), keep=1)
    checkpointer.save(int(state.step), state, {})
    checkpointer.close()
  if jax.process_index() == 0:
    with open(meta_path, "w") as f:
      json.dump({"stage": stage, "value_head": value_head,
                 "tokenizer": tokenizer_fingerprint(context.tokenizer), "summary": summary},
                f, indent=2, default=str)


def load_stage(context: Context, stage: str, learner: Learner, value_head: bool):
  """The parameters a step saved, restored into ``learner``'s shardings.

  Raises:
    ConfigError: naming the input key if the step is missing, was trained with
      another tokenizer, or holds the wrong kind of model (value head or not).
  """
  directory = context.input_dir(stage)
  key = f"rlhf.{INPUT_KEYS[stage]}"
  path = os.path.join(directory, STAGE_FILE)
  if not os.path.exists(path):
    raise ConfigError(key, f"no finished {stage} step in {directory} (no {STAGE_FILE}); run "
                      f"--stages={stage} first or point {key} to one")
  with open(path) as f:
    meta = json.load(f)
  if meta["value_head"] != value_head:
    held = "a reward model (value head)" if meta["value_head"] else "a model without a value head"
    needed = "a reward model with a value head" if value_head else "a language model"
    raise ConfigError(key, f"{directory} holds {held}, but {needed} is needed here")
  fingerprint = tokenizer_fingerprint(context.tokenizer)
  if meta["tokenizer"] != fingerprint:
    raise ConfigError(key, f"{directory} was trained with tokenizer {meta['tokenizer']}, but "
                      f"this run's actor uses {fingerprint}; every model of an RLHF run must "
                      "share one tokenizer")
  return restore_latest(directory, learner.abstract_state(), key).params


# -- the steps ------------------------------------------------------------------------------


def run_pretrain(context: Context) -> tuple[dict[str, Any], list[dict]]:
  """Trains the base language model with the ordinary trainer (``config.steps`` etc.)."""
  directory = context.output_dir("pretrain")
  summary = train(context.config, directory)
  summary = {"pretrain_val_loss": summary["val_loss"], "pretrain_steps": summary["steps"]}
  save_stage(context, "pretrain", None, False, summary)
  return summary, []


def run_sft(context: Context) -> tuple[dict[str, Any], list[dict]]:
  """Step 1: fine-tunes the pretrained model on prompt + chosen answer."""
  config, sft = context.config, context.config.rlhf.sft
  actor = context.learner(False, step_optim(config.optim, sft.learning_rate, sft.warmup),
                          sft.steps)
  state = actor.start(load_stage(context, "pretrain", actor, False), config.seed)
  eval_step = make_eval_step(actor.model, actor.specs, actor.mesh)
  held_out = actor.to_device(sft_batch(context.eval_pairs, np.arange(len(context.eval_pairs)),
                                       sft.prompt_mask))
  held_out_loss = lambda params: float(np.divide(*map(float, eval_step(params, held_out))))
  before = held_out_loss(state.params)
  batch_at = lambda step: sft_batch(context.train_pairs, context.train_pairs.batch_rows(
      step, sft.batch_size, config.seed), sft.prompt_mask)
  state, records = fit(actor, state, batch_at, sft.steps, name="sft")
  summary = {"sft_val_loss_start": before, "sft_val_loss": held_out_loss(state.params)}
  save_stage(context, "sft", state, False, summary)
  return summary, records


def run_reward(context: Context) -> tuple[dict[str, Any], list[dict]]:
  """Step 2: the reward model, from the SFT model plus a fresh value head."""
  config, rm = context.config, context.config.rlhf.reward
  reward = context.learner(True, step_optim(config.optim, rm.learning_rate, rm.warmup),
                           rm.steps, reward_loss_sum(context.value_model))
  lm_params = load_stage(context, "sft", context.learner(False, config.optim, 1), False)
  params = value_params_from_lm(reward.init_params(config.seed), lm_params)
  state = reward.start(params, config.seed)
  score = context.scorer
  before = pairwise_accuracy(score, state.params, context.eval_pairs, context.mesh)
  batch_at = lambda step: reward_batch(context.train_pairs, context.train_pairs.batch_rows(
      step, rm.batch_size, config.seed))
  state, records = fit(reward, state, batch_at, rm.steps, name="reward")
  after = pairwise_accuracy(score, state.params, context.eval_pairs, context.mesh)
  summary = {"rm_accuracy_start": before["accuracy"], "rm_accuracy": after["accuracy"],
             "rm_chosen_score": after["chosen_score"],
             "rm_rejected_score": after["rejected_score"]}
  save_stage(context, "reward", state, True, summary)
  return summary, records


@dataclasses.dataclass
class RewardJudge:
  """Scores a policy's sampled answers to the held-out prompts with the reward model."""

  context: Context
  engine: HybridEngine
  reward_params: Any
  temperature: float

  def __call__(self, params, seed: int = 12345) -> tuple[float, list[str]]:
    """(mean reward-model score, the first three answers as text)."""
    prompts = self.context.eval_pairs.prompts
    saved = self.engine.generate_seconds
    tokens = self.engine.generate(params, prompts, self.context.config.rlhf.answer_len,
                                  SamplingConfig(temperature=self.temperature), seed)
    self.engine.generate_seconds = saved  # evaluation is not part of the iteration split
    batch = jax.device_put(tokens, batch_sharding(self.context.mesh))
    scores = np.asarray(self.context.scorer(self.reward_params, batch, jnp.ones(batch.shape)))
    answers = [self.context.tokenizer.decode(t[prompts.shape[1]:]) for t in tokens[:3]]
    return float(scores.mean()), answers


def _ends(records: list[dict]) -> tuple[list[dict], list[dict]]:
  """The first and the last tenth of the iterations (at least one each): their means are the
  start and end figures, since one batch of sampled answers is noisy."""
  window = max(1, len(records) // 10)
  return records[:window], records[-window:]


def _mean(records: list[dict], key: str) -> float:
  return float(np.mean([r[key] for r in records]))


def _policy_inputs(context: Context, value_head_learner: Learner, actor: Learner):
  """The SFT actor's parameters (twice: trained and frozen reference) and the reward model's."""
  sft_params = load_stage(context, "sft", actor, False)
  reward_params = load_stage(context, "reward", value_head_learner, True)
  ref_params = jax.tree.map(jnp.copy, sft_params)
  return sft_params, ref_params, reward_params


def run_ppo(context: Context) -> tuple[dict[str, Any], list[dict]]:
  """Step 3: PPO of the SFT actor against the reward model, through the hybrid engine."""
  config, ppo = context.config, context.config.rlhf.ppo
  rlhf = config.rlhf
  actor = context.learner(False, step_optim(config.optim, ppo.actor_learning_rate, ppo.warmup),
                          ppo.iterations * ppo.ppo_epochs,
                          actor_loss_sum(context.actor_model, ppo.cliprange, ppo.unsup_coef))
  critic = context.learner(True, step_optim(config.optim, ppo.critic_learning_rate, ppo.warmup),
                           ppo.iterations * ppo.ppo_epochs,
                           critic_loss_sum(context.value_model, ppo.cliprange_value))
  sft_params, ref_params, reward_params = _policy_inputs(context, critic, actor)
  engine = context.engine(sft_params)
  engine.generate_seconds = 0.0
  judge = RewardJudge(context, engine, reward_params, ppo.temperature)
  reshard = engine.reshard_communication(sft_params)
  eval_start, samples_start = judge(sft_params)
  pairs = context.train_pairs
  ptx_at = None
  if ppo.unsup_coef > 0:
    def ptx_at(i):
      tokens = pairs.take(pairs.batch_rows(i, ppo.batch_size, config.seed + 7)).sequences("chosen")
      return {PTX_INPUTS: tokens[:, :-1], PTX_TARGETS: tokens[:, 1:]}
  trainer = PpoTrainer(
      actor, critic, actor.start(sft_params, config.seed), critic.start(reward_params,
                                                                         config.seed),
      ref_params, reward_params, engine, ppo,
      prompts_at=lambda i: pairs.prompts[pairs.batch_rows(i, ppo.batch_size, config.seed + 3)],
      answer_len=rlhf.answer_len, ptx_at=ptx_at, seed=config.seed)
  records = []
  for i in range(ppo.iterations):
    records.append(trainer.iteration(i))
    if (i + 1) % 10 == 0 or i + 1 == ppo.iterations:
      r = records[-1]
      print(f"ppo iteration {i + 1}: reward={r['score']:.3f} kl={r['kl']:.3f}", flush=True)
  eval_end, samples_end = judge(trainer.actor_state.params)
  head, tail = _ends(records)
  summary = {
      "reward_start": _mean(head, "score"), "reward_end": _mean(tail, "score"),
      "kl_end": _mean(tail, "kl"),
      "heldout_reward_sft": eval_start, "heldout_reward_ppo": eval_end,
      "generate_seconds": engine.generate_seconds, "train_seconds": trainer.train_seconds,
      "generate_fraction": engine.generate_seconds / (engine.generate_seconds
                                                     + trainer.train_seconds),
      "reshard_bytes_per_device": reshard["bytes"], "reshard_collectives": reshard["rounds"],
      "samples_sft": samples_start, "samples_ppo": samples_end}
  if trainer.ema_params is not None:
    summary["heldout_reward_ppo_ema"] = judge(trainer.ema_params)[0]
  save_stage(context, "ppo", trainer.actor_state, False,
             {k: v for k, v in summary.items() if not k.startswith("samples")})
  return summary, records


def run_dpo(context: Context) -> tuple[dict[str, Any], list[dict]]:
  """DPO of the SFT actor on the preference pairs; judged by the reward model as PPO is."""
  config, dpo = context.config, context.config.rlhf.dpo
  actor = context.learner(False, step_optim(config.optim, dpo.learning_rate, dpo.warmup),
                          dpo.steps, dpo_loss_sum(context.actor_model, dpo.beta))
  value_head = context.learner(True, config.optim, 1)
  sft_params, ref_params, reward_params = _policy_inputs(context, value_head, actor)
  reference = make_reference_logprobs(context.actor_model, context.mesh)
  pairs = context.train_pairs
  batch_at = lambda step: reference(ref_params, actor.to_device(dpo_batch(
      pairs, pairs.batch_rows(step, dpo.batch_size, config.seed + 5))))
  state, records = fit(actor, actor.start(sft_params, config.seed), batch_at, dpo.steps,
                       name="dpo")
  judge = RewardJudge(context, context.engine(sft_params), reward_params,
                      config.rlhf.ppo.temperature)
  summary = {"dpo_loss_end": records[-1]["loss"], "heldout_reward_dpo": judge(state.params)[0]}
  save_stage(context, "dpo", state, False, summary)
  return summary, records


def run_grpo(context: Context) -> tuple[dict[str, Any], list[dict]]:
  """GRPO of the SFT actor against the reward model (no critic)."""
  config, grpo = context.config, context.config.rlhf.grpo
  actor = context.learner(False, step_optim(config.optim, grpo.learning_rate, grpo.warmup),
                          grpo.iterations, grpo_loss_sum(context.actor_model, grpo.cliprange,
                                                         grpo.beta))
  value_head = context.learner(True, config.optim, 1)
  sft_params, ref_params, reward_params = _policy_inputs(context, value_head, actor)
  engine = context.engine(sft_params)
  pairs = context.train_pairs
  trainer = GrpoTrainer(
      actor, actor.start(sft_params, config.seed), ref_params, context.value_model,
      reward_params, engine, grpo,
      prompts_at=lambda i: pairs.prompts[pairs.batch_rows(i, grpo.prompts, config.seed + 9)],
      answer_len=config.rlhf.answer_len, temperature=grpo.temperature, seed=config.seed)
  records = [trainer.iteration(i) for i in range(grpo.iterations)]
  judge = RewardJudge(context, engine, reward_params, grpo.temperature)
  head, tail = _ends(records)
  summary = {"grpo_reward_start": _mean(head, "score"), "grpo_reward_end": _mean(tail, "score"),
             "grpo_kl_end": _mean(tail, "kl"),
             "heldout_reward_grpo": judge(trainer.actor_state.params)[0]}
  save_stage(context, "grpo", trainer.actor_state, False, summary)
  return summary, records


STEPS = {"pretrain": run_pretrain, "sft": run_sft, "reward": run_reward, "ppo": run_ppo,
         "dpo": run_dpo, "grpo": run_grpo}
