"""The configuration schema, its defaults, and validation before anything compiles.

A config is an ``ml_collections.ConfigDict``. ``default_config()`` lists every
key jaxspeed understands; files in ``configs/`` start from it and override
fields, and absl flags override any field (``--config.zero.stage=3``).
``validate`` rejects a bad value with a ``ConfigError`` naming its key.
"""

from __future__ import annotations

import math

import ml_collections

from jaxspeed.errors import ConfigError
from jaxspeed.inference.compression import POLICIES
from jaxspeed.models.attention import ATTENTION_IMPLS
from jaxspeed.models.config import DTYPES, POSITIONS, REMAT_POLICIES
from jaxspeed.moe.config import NOISY_GATE_POLICIES, RESIDUAL_MIXES
from jaxspeed.moe.gating import DROP_POLICIES
from jaxspeed.parallel.mesh import DATA_AXES, resolve_mesh_shape

ONEBIT_OPTIMIZERS = ("onebit_adam", "onebit_lamb", "zero_one_adam")
OPTIMIZERS = ("adamw", "adam", "lamb", "sgd", *ONEBIT_OPTIMIZERS)
SCHEDULES = ("cosine", "linear", "constant")
LR_UNITS = ("steps", "tokens", "layer_tokens")
TOKENIZERS = ("byte", "bpe")
MODEL_NAMES = ("gpt", "bert")
ZERO_STAGES = (0, 1, 2, 3)


def default_config() -> ml_collections.ConfigDict:
  """Every config key, with defaults for a tiny GPT on one CPU."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 100
  c.batch_size = 16  # global, in sequences
  c.seq_len = 128
  # Gradient accumulation steps per optimizer step; with parallel.stage > 1, the
  # pipeline's microbatches (DeepSpeed's gradient_accumulation_steps in its PipelineEngine).
  c.microbatches = 1
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 4
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  c.peak_flops = 0.0  # FLOP/s of all devices, for MFU; 0 = from the device kind (devices.py)
  c.sample_tokens = 64  # length of the text sample printed at the end; 0 to skip
  c.sample_prompt = "The "

  c.model = ml_collections.ConfigDict()
  c.model.name = "gpt"
  c.model.vocab_size = 256
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 0  # grouped-query attention; 0 means num_heads
  c.model.d_model = 64
  c.model.d_ff = 256
  c.model.max_seq_len = 128
  c.model.position = "learned"
  c.model.embed_layernorm = False
  c.model.tie_embeddings = True
  c.model.dropout = 0.0
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.model.attention = "xla"

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.learning_rate = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.momentum = 0.9  # sgd only
  c.optim.grad_clip = 1.0  # global-norm clip; 0 disables
  c.optim.schedule = "cosine"
  c.optim.lr_unit = "steps"  # warmup/decay lengths counted in steps or in tokens
  c.optim.warmup = 10
  c.optim.decay = 0  # decay length; 0 means the whole run
  c.optim.min_lr_ratio = 0.1
  # 1-bit Adam / 1-bit LAMB: warm-up updates before compression (DeepSpeed's defaults below).
  c.optim.freeze_step = 100000
  c.optim.bias_correction = False  # 1-bit Adam only; DeepSpeed has none
  c.optim.max_coeff = 10.0  # 1-bit LAMB trust-ratio bounds and EMA
  c.optim.min_coeff = 0.01
  c.optim.coeff_beta = 0.9
  c.optim.factor_max = 4.0  # 1-bit LAMB compression-stage factor bounds and rate limit
  c.optim.factor_min = 0.5
  c.optim.factor_threshold = 0.1
  c.optim.var_freeze_step = 100000  # 0/1 Adam
  c.optim.var_update_scaler = 16
  c.optim.local_step_scaler = 32678  # DeepSpeed's default (likely meant 32768)
  c.optim.local_step_clipper = 16

  c.zero = ml_collections.ConfigDict()
  c.zero.stage = 0

  c.parallel = ml_collections.ConfigDict()
  for axis in ("data", "fsdp", "stage", "expert", "sequence", "tensor"):
    c.parallel[axis] = 1
  c.parallel.data = -1
  # True: a layout that does not fit the devices drops axes (tensor first) and fills
  # data instead of failing; the chosen mesh is printed (configs/gpt_tiny.py sets it).
  c.fit_parallel = False
  # DeepSpeed-Ulysses needs seq_len % parallel.sequence == 0; pad=True right-pads
  # causal-LM batches to a multiple instead (padded targets do not count).
  c.sequence_parallel = ml_collections.ConfigDict(dict(pad=False))

  c.data_efficiency = _data_efficiency_defaults()
  c.compression = _compression_defaults()
  c.moe = _moe_defaults()
  c.kd = _kd_defaults()

  c.inference = _inference_defaults()
  c.rlhf = _rlhf_defaults()

  c.data = ml_collections.ConfigDict()
  c.data.corpus = "python_docs"  # or comma-separated .txt/.jsonl paths
  c.data.jsonl_field = "text"
  c.data.tokenizer = "byte"
  c.data.bpe_vocab_size = 1024
  c.data.val_fraction = 0.05
  return c


def _schedule_defaults(**overrides) -> ml_collections.ConfigDict:
  """Curriculum schedule keys, as in DeepSpeed's ``schedule_config``."""
  schedule = ml_collections.ConfigDict(dict(
      schedule_type="fixed_linear", min_difficulty=8, max_difficulty=128,
      total_curriculum_step=100, difficulty_step=8, root_degree=1,
      difficulties=[0], max_steps=[0]))
  schedule.update(overrides)
  return schedule


def _data_efficiency_defaults() -> ml_collections.ConfigDict:
  """DeepSpeed Data Efficiency (Li et al. 2022): curricula, random-LTD, PLD; all off."""
  c = ml_collections.ConfigDict()
  # Sequence-length curriculum: each batch cut to the scheduled length.
  c.seqlen = _schedule_defaults(enabled=False, mode="seqlen_truncate")
  # Curriculum sampling over a data-analyzer metric (easiest samples first).
  c.curriculum = _schedule_defaults(
      enabled=False, metric="vocab_rarity", difficulty_type="percentile",
      schedule_type="fixed_root", min_difficulty=1, max_difficulty=100, difficulty_step=1,
      root_degree=2, analysis_workers=1)
  # Random layerwise token dropping: kept length grows min_value -> max_value.
  c.random_ltd = ml_collections.ConfigDict(dict(
      enabled=False, min_value=16, max_value=0, require_steps=100, seq_per_step=16))
  # Progressive layer dropping: theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar.
  c.pld = ml_collections.ConfigDict(dict(enabled=False, theta=0.5, gamma=0.001))
  return c


def _compression_defaults() -> ml_collections.ConfigDict:
  """DeepSpeed's ``compression_training`` with one group per technique; all off.

  ``modules`` are comma-separated regexes searched in each weight's params path
  (e.g. ``layer_0/attention/query``, ``layer_1/mlp/wi``, ``embed/table``).
  """
  c = ml_collections.ConfigDict()
  c.weight_quantization = ml_collections.ConfigDict(dict(
      enabled=False, schedule_offset=0, quantize_groups=1, quantization_type="symmetric",
      target_bits=8, modules="attention,mlp"))
  c.activation_quantization = ml_collections.ConfigDict(dict(
      enabled=False, schedule_offset=1000, quantization_type="symmetric",
      range_calibration="dynamic", bits=8, modules="attention,mlp"))
  # N:M semi-structured sparsity: in every group of m consecutive input weights of an
  # output channel, the n largest in magnitude are kept (mask recomputed each step).
  c.sparse_pruning = ml_collections.ConfigDict(dict(
      enabled=False, schedule_offset=0, n=2, m=4, modules="mlp"))
  return c


def _validate_compression(config: ml_collections.ConfigDict) -> None:
  comp = config.compression
  for section in ("weight_quantization", "activation_quantization"):
    _choice(config, f"compression.{section}.quantization_type", ("symmetric", "asymmetric"))
    _positive(config, f"compression.{section}.schedule_offset", allow_zero=True)
  if not 1 <= comp.weight_quantization.target_bits <= 8:
    raise ConfigError("compression.weight_quantization.target_bits",
                      f"must be in 1..8 (1 binary, 2 ternary), got "
                      f"{comp.weight_quantization.target_bits}")
  _positive(config, "compression.weight_quantization.quantize_groups")
  if not 2 <= comp.activation_quantization.bits <= 8:
    raise ConfigError("compression.activation_quantization.bits",
                      f"must be in 2..8, got {comp.activation_quantization.bits}")
  # Static ranges need calibration state carried through training; the trainer
  # quantizes activations token-wise on the fly (ZeroQuant's choice).
  _choice(config, "compression.activation_quantization.range_calibration", ("dynamic",))
  sp = comp.sparse_pruning
  if not 1 <= sp.n < sp.m:
    raise ConfigError("compression.sparse_pruning.n", f"need 1 <= n < m, got n={sp.n}, "
                      f"m={sp.m}")
  _positive(config, "compression.sparse_pruning.schedule_offset", allow_zero=True)


def _inference_defaults() -> ml_collections.ConfigDict:
  """Generation (``experiments.generate``), with DeepSpeed Inference's names where they exist."""
  c = ml_collections.ConfigDict()
  c.max_out_tokens = 0  # KV-cache slots per sequence; 0 = model.max_seq_len
  c.max_new_tokens = 64
  c.temperature = 0.0  # 0 = greedy
  c.top_k = 0  # 0 = no top-k cut
  c.top_p = 1.0
  c.stop_tokens = ""  # comma-separated token ids
  c.seed = 0
  c.tensor_parallel = ml_collections.ConfigDict(dict(tp_size=1))
  c.kv_compression = ml_collections.ConfigDict(dict(
      policy="full", budget=1.0, sink_tokens=4, recent_ratio=0.5, threshold=0.95,
      fastgen_ratio=0.3, merge_threshold=0.8, merge_sigma=1.0, window=32))
  return c


def _rlhf_defaults() -> ml_collections.ConfigDict:
  """DeepSpeed-Chat's three steps, DPO and GRPO (``experiments.rlhf``; ``jaxspeed.rlhf``).

  Model, mesh, ZeRO stage and optimizer come from the rest of the config, as
  for pre-training; each step sets its own length, batch and learning rate.
  DeepSpeed-Chat's defaults are kept where they carry over (KL 0.1, reward
  clip 5, clip ranges 0.2, γ 1, λ 0.95, EMA 0.992, one PPO epoch); its
  learning rates (actor 9.65e-6, critic 5e-6) are for OPT-1.3B and far too
  small for a model trained from scratch in minutes.
  """
  c = ml_collections.ConfigDict()
  c.prompt_len = 48  # tokens; the task's prompts are windows of real text
  c.answer_len = 24  # DeepSpeed-Chat's max_answer_seq_len
  c.num_pairs = 4096  # training preference pairs (from data.corpus's train split)
  c.eval_pairs = 256  # held-out pairs (from the validation split)
  c.rejected = "shuffle,swap"  # how rejected answers are corrupted (jaxspeed.rlhf.data)
  # Where each step finds its input; "" = <workdir>/pretrain, /sft and /reward.
  c.init_workdir = ""
  c.actor_workdir = ""
  c.reward_workdir = ""
  c.sft = ml_collections.ConfigDict(dict(
      steps=200, batch_size=32, learning_rate=1e-3, warmup=10,
      prompt_mask=False))  # DeepSpeed-Chat trains on the prompt tokens too
  c.reward = ml_collections.ConfigDict(dict(steps=500, batch_size=32, learning_rate=1e-3,
                                            warmup=20))
  c.ppo = ml_collections.ConfigDict(dict(
      iterations=60, batch_size=32, ppo_epochs=1, actor_learning_rate=1e-4,
      critic_learning_rate=1e-4, warmup=0, kl_ctl=0.1, clip_reward_value=5.0, cliprange=0.2,
      cliprange_value=0.2, gamma=1.0, lam=0.95,
      temperature=1.0, top_k=0,  # sampling of the answers
      whiten_advantages=False,  # not in DeepSpeed-Chat
      adaptive_kl=False, kl_target=6.0, kl_horizon=10000,  # Ziegler et al.; not in DeepSpeed-Chat
      unsup_coef=0.0,  # PTX mix; DeepSpeed-Chat uses 27.8 when a pretraining set is given
      enable_ema=True, ema_beta=0.992))
  c.dpo = ml_collections.ConfigDict(dict(steps=100, batch_size=32, learning_rate=1e-4,
                                         warmup=0, beta=0.1))
  c.grpo = ml_collections.ConfigDict(dict(
      iterations=60, prompts=8, group_size=4, learning_rate=1e-4, warmup=0, beta=0.04,
      cliprange=0.2, temperature=1.0))
  return c


RLHF_STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo")


def validate_rlhf(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """``validate`` plus the checks of ``config.rlhf``; returns the mesh shape.

  Raises:
    ConfigError: naming the first bad key and the allowed values.
  """
  shape = validate(config, num_devices)
  rlhf = config.rlhf
  _choice(config, "model.name", ("gpt",))
  for axis in ("stage", "expert", "sequence"):
    if shape[axis] > 1:
      raise ConfigError(f"parallel.{axis}", "the RLHF steps train on data / fsdp / tensor "
                        f"axes (ZeRO and tensor parallelism); got parallel.{axis}={shape[axis]}")
  if config.optim.name in ONEBIT_OPTIMIZERS:
    raise ConfigError("optim.name", f"the RLHF steps use optax optimizers; got "
                      f"{config.optim.name!r}, allowed: adamw, adam, lamb, sgd")
  for key in ("prompt_len", "answer_len", "num_pairs", "eval_pairs", "sft.steps",
              "sft.batch_size", "sft.learning_rate", "reward.steps", "reward.batch_size",
              "reward.learning_rate", "ppo.iterations", "ppo.batch_size", "ppo.ppo_epochs",
              "ppo.actor_learning_rate", "ppo.critic_learning_rate", "ppo.clip_reward_value",
              "ppo.kl_target", "ppo.kl_horizon", "dpo.steps", "dpo.batch_size",
              "dpo.learning_rate", "dpo.beta", "grpo.iterations", "grpo.prompts",
              "grpo.group_size", "grpo.learning_rate"):
    _positive(config, f"rlhf.{key}")
  for key in ("ppo.kl_ctl", "ppo.cliprange", "ppo.cliprange_value", "ppo.temperature",
              "ppo.top_k", "ppo.unsup_coef", "grpo.beta", "grpo.cliprange",
              "grpo.temperature", "sft.warmup", "reward.warmup", "ppo.warmup", "dpo.warmup",
              "grpo.warmup"):
    _positive(config, f"rlhf.{key}", allow_zero=True)
  for key in ("ppo.gamma", "ppo.lam", "ppo.ema_beta"):
    value = rlhf.ppo[key.split(".")[1]]
    if not 0 <= value <= 1:
      raise ConfigError(f"rlhf.{key}", f"must be in [0, 1], got {value!r}")
  if rlhf.grpo.group_size < 2:
    raise ConfigError("rlhf.grpo.group_size", f"GRPO compares answers within a group: need >= 2,"
                      f" got {rlhf.grpo.group_size}")
  if rlhf.prompt_len + rlhf.answer_len > config.model.max_seq_len:
    raise ConfigError("rlhf.answer_len", f"prompt_len + answer_len = "
                      f"{rlhf.prompt_len + rlhf.answer_len} exceeds model.max_seq_len="
                      f"{config.model.max_seq_len}")
  dp = math.prod(shape[a] for a in DATA_AXES)
  for key in ("sft.batch_size", "reward.batch_size", "ppo.batch_size", "dpo.batch_size"):
    if rlhf[key.split(".")[0]].batch_size % dp:
      raise ConfigError(f"rlhf.{key}", f"{rlhf[key.split('.')[0]].batch_size} is not divisible "
                        f"by the data-parallel size {dp}")
  if (rlhf.grpo.prompts * rlhf.grpo.group_size) % dp:
    raise ConfigError("rlhf.grpo.prompts", f"prompts x group_size = "
                      f"{rlhf.grpo.prompts * rlhf.grpo.group_size} is not divisible by the "
                      f"data-parallel size {dp}")
  return shape


def _validate_inference(config: ml_collections.ConfigDict, num_devices: int) -> None:
  inf = config.inference
  _choice(config, "inference.kv_compression.policy", POLICIES)
  kv = inf.kv_compression
  for key in ("budget", "threshold", "recent_ratio", "fastgen_ratio"):
    if not 0 < kv[key] <= 1:
      raise ConfigError(f"inference.kv_compression.{key}", f"must be in (0, 1], got {kv[key]!r}")
  if kv.policy == "minikv" and (config.model.d_model // config.model.num_heads) % 4:
    raise ConfigError("inference.kv_compression.policy", "minikv packs four 2-bit codes per "
                      "byte; the head dimension (model.d_model / model.num_heads) must be a "
                      "multiple of 4")
  if kv.policy == "minikv" and kv.window < 1:
    raise ConfigError("inference.kv_compression.window", f"must be >= 1, got {kv.window}")
  if inf.max_out_tokens < 0 or (config.model.position == "learned"
                                and inf.max_out_tokens > config.model.max_seq_len):
    raise ConfigError("inference.max_out_tokens", f"must be in [0, model.max_seq_len="
                      f"{config.model.max_seq_len}] with learned positions (0 = max_seq_len), "
                      f"got {inf.max_out_tokens}")
  _positive(config, "inference.max_new_tokens")
  _positive(config, "inference.temperature", allow_zero=True)
  _positive(config, "inference.top_k", allow_zero=True)
  if not 0 < inf.top_p <= 1:
    raise ConfigError("inference.top_p", f"must be in (0, 1], got {inf.top_p!r}")
  try:
    [int(t) for t in str(inf.stop_tokens).split(",") if t.strip()]
  except ValueError as e:
    raise ConfigError("inference.stop_tokens", f"comma-separated token ids, got "
                      f"{inf.stop_tokens!r}") from e
  tp = inf.tensor_parallel.tp_size
  if tp < 1 or num_devices % tp:
    raise ConfigError("inference.tensor_parallel.tp_size", f"must divide the {num_devices} "
                      f"devices, got {tp}")
  for key in ("num_heads", "d_ff", "vocab_size"):
    if config.model[key] % tp:
      raise ConfigError("inference.tensor_parallel.tp_size", f"model.{key}={config.model[key]}"
                        f" is not divisible by tp_size={tp}")


def _moe_defaults() -> ml_collections.ConfigDict:
  """DeepSpeed-MoE (``deepspeed.moe.layer.MoE`` and Megatron-DeepSpeed's flags); off."""
  return ml_collections.ConfigDict(dict(
      num_experts=1,  # 1: dense model
      layer_num_experts=(),  # PR-MoE pyramid: experts of each MoE layer, e.g. (4, 8)
      expert_interval=2,  # every 2nd layer is MoE (Megatron-DeepSpeed --expert-interval)
      top_k=1,
      capacity_factor=1.0,
      eval_capacity_factor=1.0,
      min_capacity=4,
      noisy_gate_policy="none",  # none, Jitter or RSample
      drop_tokens=True,  # False: dropless (grouped matmul)
      use_rts=True,
      top2_2nd_expert_sampling=True,
      drop_policy="probs",  # top-k (k > 2): probs or position
      use_residual=False,  # Residual-MoE
      residual_mix="sum",  # sum (paper) or learned (DeepSpeed's softmax coefficient)
      aux_loss_coef=0.01,  # DeepSpeed tutorial; Megatron's --moe-loss-coeff default is 0.1
  ))


def _kd_defaults() -> ml_collections.ConfigDict:
  """MoS knowledge distillation from a trained teacher (Megatron-DeepSpeed ``--kd``); off."""
  return ml_collections.ConfigDict(dict(
      enabled=False,
      teacher_workdir="",  # --load-teacher: a finished run's workdir (its checkpoints)
      num_layers_teacher=0,  # 0: the student's model.num_layers
      num_experts_teacher=(),  # the teacher's moe.layer_num_experts; empty: the student's
      temperature=1.0,  # --kd-temp
      alpha_ce=1.0,  # --kd-alpha-ce
      beta_ce=1.0,  # --kd-beta-ce
      stop_step=0,  # staged KD: plain LM loss from this step on; 0 distills throughout
  ))


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                prefix: str = "") -> None:
  for key in config:
    path = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(path, f"unknown key; known keys here: {', '.join(sorted(schema.keys()))}")
    if isinstance(schema[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        raise ConfigError(path, "must be a section, not a value")
      _check_keys(config[key], schema[key], prefix=f"{path}.")


def check_override_keys(argv: list[str], flag: str = "config") -> None:
  """Rejects ``--config.a.b=...`` overrides whose key is not in the schema.

  ``ml_collections`` would fail on them too, but deep inside flag parsing with
  a traceback; this names the key and the keys allowed next to it.
  """
  schema = default_config()
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].split("=", 1)[0]
    node, path = schema, []
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) \
            else "none (not a section)"
        raise ConfigError(".".join([*path, part]), f"unknown key; known keys here: {known}")
      node, path = node[part], [*path, part]


def _choice(config, key: str, allowed) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if value not in allowed:
    raise ConfigError(key, f"got {value!r}; allowed values: {', '.join(map(str, allowed))}")


def _positive(config, key: str, allow_zero: bool = False) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigError(key, f"must be {bound}, got {value!r}")


def _validate_data_efficiency(config: ml_collections.ConfigDict) -> None:
  de = config.data_efficiency
  if de.seqlen.enabled and de.seqlen.max_difficulty > config.seq_len:
    raise ConfigError("data_efficiency.seqlen.max_difficulty",
                      f"{de.seqlen.max_difficulty} exceeds seq_len={config.seq_len}")
  ltd = de.random_ltd
  if ltd.enabled:
    if config.model.num_layers < 3:
      raise ConfigError("data_efficiency.random_ltd.enabled", "random-LTD drops tokens in the "
                        f"middle layers; it needs model.num_layers >= 3, got "
                        f"{config.model.num_layers}")
    max_value = ltd.max_value or config.seq_len
    if not 1 <= ltd.min_value <= max_value:
      raise ConfigError("data_efficiency.random_ltd.min_value",
                        f"need 1 <= min_value <= max_value, got {ltd.min_value} and "
                        f"{max_value}")
    if max_value > config.seq_len:
      raise ConfigError("data_efficiency.random_ltd.max_value", f"kept length {max_value} "
                        f"exceeds seq_len={config.seq_len}")
    for key in ("require_steps", "seq_per_step"):
      if ltd[key] < 1:
        raise ConfigError(f"data_efficiency.random_ltd.{key}", f"must be >= 1, got {ltd[key]}")
  if config.optim.lr_unit == "layer_tokens" and not ltd.enabled:
    raise ConfigError("optim.lr_unit", "'layer_tokens' counts random-LTD's layer-tokens; "
                      "enable data_efficiency.random_ltd or use 'steps' or 'tokens'")
  pld = de.pld
  if pld.enabled:
    if not 0 < pld.theta <= 1:
      raise ConfigError("data_efficiency.pld.theta", f"must be in (0, 1], got {pld.theta}")
    if pld.gamma < 0:
      raise ConfigError("data_efficiency.pld.gamma", f"must be >= 0, got {pld.gamma}")


def _validate_sequence_parallel(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  """DeepSpeed-Ulysses: heads split over tensor x sequence, sequence split over sequence."""
  sp, tp, model = shape["sequence"], shape["tensor"], config.model
  if config.sequence_parallel.pad and model.name != "gpt":
    raise ConfigError("sequence_parallel.pad", "padding is invisible only to a causal model; "
                      f"allowed with model.name=gpt, got {model.name!r}")
  if sp == 1:
    return
  if model.num_heads % (tp * sp):
    raise ConfigError("model.num_heads", f"{model.num_heads} heads cannot be split over "
                      f"parallel.tensor x parallel.sequence = {tp} x {sp}; need a multiple of "
                      f"{tp * sp}")
  local_kv = (model.num_kv_heads or model.num_heads) // tp
  if local_kv % sp and sp % local_kv:
    raise ConfigError("model.num_kv_heads", f"{local_kv} kv heads per tensor shard must be a "
                      f"multiple or a divisor of parallel.sequence={sp}")
  lengths = {"seq_len": config.seq_len}
  seqlen = config.data_efficiency.seqlen
  if seqlen.enabled:
    lengths["data_efficiency.seqlen.difficulty_step"] = seqlen.difficulty_step
  for key, length in lengths.items():
    if length % sp and not config.sequence_parallel.pad:
      raise ConfigError(key, f"{length} is not divisible by parallel.sequence={sp} (DeepSpeed "
                        "issue #5177); change it or set sequence_parallel.pad=True")
  padded = -(-config.seq_len // sp) * sp
  if padded > model.max_seq_len:
    raise ConfigError("model.max_seq_len", f"seq_len padded to {padded} exceeds "
                      f"max_seq_len={model.max_seq_len}")
  if config.optim.name in ONEBIT_OPTIMIZERS:
    exact = [o for o in OPTIMIZERS if o not in ONEBIT_OPTIMIZERS]
    raise ConfigError("optim.name", f"{config.optim.name} is not supported with sequence "
                      f"parallelism; allowed: {', '.join(exact)}")
  if config.data_efficiency.random_ltd.enabled:
    raise ConfigError("data_efficiency.random_ltd.enabled", "random-LTD's kept tokens are not "
                      "split over parallel.sequence; disable one of them")


def _validate_pipeline(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  """GPipe over ``parallel.stage``: layers split evenly, and the techniques it runs with."""
  stages = shape["stage"]
  if stages == 1:
    return
  layers = config.model.num_layers
  if stages > layers:
    raise ConfigError("parallel.stage", f"{stages} pipeline stages exceed model.num_layers="
                      f"{layers}; each stage needs at least one layer")
  if layers % stages:
    raise ConfigError("parallel.stage", f"model.num_layers={layers} does not split evenly "
                      f"into {stages} stages; use a divisor of {layers}")
  unsupported = {
      "model.name": (config.model.name != "gpt", "the pipeline runs the GPT decoder; allowed "
                     "value with parallel.stage > 1: 'gpt'"),
      "optim.name": (config.optim.name in ONEBIT_OPTIMIZERS, "1-bit optimizers do not run "
                     "with a pipeline yet; allowed: " + ", ".join(
                         o for o in OPTIMIZERS if o not in ONEBIT_OPTIMIZERS)),
      "zero.stage": (config.zero.stage > 1, "ZeRO stages 2 and 3 are not supported with a "
                     f"pipeline yet; allowed: 0, 1 (got {config.zero.stage})"),
      "data_efficiency.random_ltd.enabled": (config.data_efficiency.random_ltd.enabled,
                                             "random-LTD does not run in a pipeline yet"),
      "data_efficiency.pld.enabled": (config.data_efficiency.pld.enabled,
                                      "progressive layer dropping does not run in a "
                                      "pipeline yet"),
      "model.dropout": (config.model.dropout > 0, "dropout does not run in a pipeline yet; "
                        "allowed: 0"),
      "parallel.sequence": (shape["sequence"] > 1, "sequence parallelism does not run inside "
                            "pipeline stages yet; allowed: 1"),
      **{f"compression.{section}.enabled": (config.compression[section].enabled,
                                            "compression does not run in a pipeline yet")
         for section in ("weight_quantization", "activation_quantization", "sparse_pruning")},
  }
  for key, (bad, why) in unsupported.items():
    if bad:
      raise ConfigError(key, f"{why} (parallel.stage={stages})")


def _validate_moe(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  moe = config.moe
  _choice(config, "moe.noisy_gate_policy", NOISY_GATE_POLICIES)
  _choice(config, "moe.drop_policy", DROP_POLICIES)
  _choice(config, "moe.residual_mix", RESIDUAL_MIXES)
  for key in ("moe.num_experts", "moe.expert_interval", "moe.top_k", "moe.capacity_factor",
              "moe.eval_capacity_factor"):
    _positive(config, key)
  _positive(config, "moe.min_capacity", allow_zero=True)
  _positive(config, "moe.aux_loss_coef", allow_zero=True)
  layers = config.model.num_layers
  moe_layers = layers // moe.expert_interval
  counts = list(moe.layer_num_experts) or [moe.num_experts]
  if moe.layer_num_experts and len(counts) != moe_layers:
    raise ConfigError("moe.layer_num_experts", f"needs one expert count per MoE layer: "
                      f"{moe_layers} (model.num_layers={layers} // moe.expert_interval="
                      f"{moe.expert_interval}), got {len(counts)}")
  if any(not isinstance(e, int) or e < 1 for e in counts):
    raise ConfigError("moe.layer_num_experts", f"expert counts must be ints >= 1, got {counts}")
  enabled = max(counts) > 1
  ep = shape["expert"]
  if not enabled:
    if ep > 1:
      raise ConfigError("parallel.expert", f"expert parallelism ({ep}) needs experts: set "
                        "moe.num_experts (or moe.layer_num_experts) above 1")
    return
  if moe_layers == 0:
    raise ConfigError("moe.expert_interval", f"{moe.expert_interval} exceeds model.num_layers="
                      f"{layers}, so no layer would be an MoE layer")
  if config.model.name != "gpt":
    raise ConfigError("moe.num_experts", "MoE layers are built into the GPT decoder; set "
                      "model.name='gpt' or moe.num_experts=1")
  if moe.top_k > min(counts):
    raise ConfigError("moe.top_k", f"{moe.top_k} exceeds the number of experts of a layer "
                      f"({min(counts)}); allowed: 1..{min(counts)}")
  bad = [e for e in counts if e % ep]
  if bad:
    key = "moe.layer_num_experts" if moe.layer_num_experts else "moe.num_experts"
    raise ConfigError(key, f"{bad[0]} experts are not divisible by the expert-parallel size "
                      f"parallel.expert={ep}")
  if ep > 1 and config.optim.name in ONEBIT_OPTIMIZERS:
    optax_names = ", ".join(o for o in OPTIMIZERS if o not in ONEBIT_OPTIMIZERS)
    raise ConfigError("optim.name", f"{config.optim.name} compresses whole-model gradients "
                      "per data-parallel worker; with parallel.expert > 1 use an optax "
                      f"optimizer ({optax_names})")
  if config.data_efficiency.pld.enabled:
    raise ConfigError("data_efficiency.pld.enabled", "progressive layer dropping skips layers "
                      "inside a conditional, where MoE statistics cannot be collected; "
                      "disable one of them")
  if shape["stage"] > 1:
    raise ConfigError("parallel.stage", "MoE layers do not run inside pipeline stages yet; "
                      "allowed: 1")


def _validate_kd(config: ml_collections.ConfigDict) -> None:
  kd = config.kd
  if not kd.enabled:
    return
  if config.model.name != "gpt":
    raise ConfigError("kd.enabled", "MoS distillation trains a GPT student; set model.name='gpt'")
  if not kd.teacher_workdir:
    raise ConfigError("kd.teacher_workdir", "distillation needs the workdir of a trained teacher")
  for key in ("kd.temperature",):
    _positive(config, key)
  for key in ("kd.alpha_ce", "kd.beta_ce", "kd.stop_step", "kd.num_layers_teacher"):
    _positive(config, key, allow_zero=True)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Checks every field; returns the resolved mesh shape.

  Raises:
    ConfigError: naming the first bad key and the allowed values.
  """
  _check_keys(config, default_config())
  _choice(config, "model.name", MODEL_NAMES)
  _choice(config, "model.position", POSITIONS)
  _choice(config, "model.dtype", tuple(DTYPES))
  _choice(config, "model.remat", REMAT_POLICIES)
  _choice(config, "model.attention", tuple(ATTENTION_IMPLS))
  _choice(config, "optim.name", OPTIMIZERS)
  _choice(config, "optim.schedule", SCHEDULES)
  _choice(config, "optim.lr_unit", LR_UNITS)
  _choice(config, "zero.stage", ZERO_STAGES)
  _choice(config, "data.tokenizer", TOKENIZERS)
  for key in ("steps", "batch_size", "seq_len", "microbatches", "log_every", "eval_every",
              "eval_batches", "checkpoint_every", "keep_checkpoints", "optim.learning_rate",
              "model.vocab_size", "model.num_layers", "model.num_heads", "model.d_model",
              "model.d_ff", "model.max_seq_len"):
    _positive(config, key)
  for key in ("optim.weight_decay", "optim.grad_clip", "optim.warmup", "optim.decay",
              "optim.eps", "sample_tokens", "peak_flops"):
    _positive(config, key, allow_zero=True)
  for key in ("optim.b1", "optim.b2", "optim.min_lr_ratio", "model.dropout",
              "data.val_fraction"):
    value = config[key.split(".")[0]][key.split(".")[1]]
    if not 0 <= value < 1 + (key == "optim.min_lr_ratio"):
      raise ConfigError(key, f"must be in [0, 1), got {value!r}")

  shape = resolve_mesh_shape(config.parallel, num_devices)
  model = config.model
  if model.d_model % model.num_heads:
    raise ConfigError("model.num_heads",
                      f"must divide model.d_model={model.d_model}, got {model.num_heads}")
  if model.position == "rope" and (model.d_model // model.num_heads) % 2:
    raise ConfigError("model.position", "rope needs an even head dimension")
  if config.seq_len > model.max_seq_len:
    raise ConfigError("seq_len", f"{config.seq_len} exceeds model.max_seq_len="
                      f"{model.max_seq_len}")
  tp = shape["tensor"]
  kv_heads = model.num_kv_heads or model.num_heads
  if model.num_kv_heads < 0 or model.num_heads % kv_heads:
    raise ConfigError("model.num_kv_heads", f"must divide model.num_heads={model.num_heads} "
                      f"(0 means num_heads), got {model.num_kv_heads}")
  for key, value in (("num_heads", model.num_heads), ("num_kv_heads", kv_heads),
                     ("d_ff", model.d_ff), ("vocab_size", model.vocab_size)):
    if value % tp:
      raise ConfigError(f"model.{key}", f"{value} is not divisible by the tensor-parallel "
                        f"size parallel.tensor={tp}")
  _validate_sequence_parallel(config, shape)
  dp = math.prod(shape[a] for a in DATA_AXES)
  if config.batch_size % (dp * config.microbatches):
    raise ConfigError("batch_size", f"{config.batch_size} is not divisible by data-parallel size "
                      f"(parallel.data x parallel.fsdp x parallel.expert = {dp}) x microbatches "
                      f"({config.microbatches})")
  if config.optim.name in ONEBIT_OPTIMIZERS and config.zero.stage > 1:
    raise ConfigError("zero.stage", f"{config.optim.name} compresses each worker's full local "
                      f"gradient or momentum, so gradients cannot be ZeRO-sharded; allowed "
                      f"stages: 0, 1 (got {config.zero.stage})")
  _validate_data_efficiency(config)
  _validate_compression(config)
  _validate_inference(config, num_devices)
  _validate_pipeline(config, shape)
  _validate_moe(config, shape)
  _validate_kd(config)
  return shape
