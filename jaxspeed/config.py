"""The configuration schema, its defaults, and validation before anything compiles.

A config is an ``ml_collections.ConfigDict``. Each technique declares its
section once, as a frozen dataclass holding the defaults and checking its own
fields (``jaxspeed.schema.Section``); ``default_config()`` is generated from
them. Files in ``configs/`` start from it and override fields, and absl flags
override any field (``--config.zero.stage=3``). ``validate`` rejects a bad
value with a ``ConfigError`` naming its key: first every section's own fields,
then the rules across sections, then the compatibility table
(``jaxspeed.compatibility``).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
from absl import logging

from jaxspeed.compatibility import check_compatibility
from jaxspeed.compression.config import CompressionTrainingConfig
from jaxspeed.compression.milo import MiloConfig
from jaxspeed.data.config import DataConfig
from jaxspeed.data_efficiency.config import DataEfficiencyConfig
from jaxspeed.errors import ConfigError
from jaxspeed.inference.config import InferenceConfig
from jaxspeed.models.config import ModelConfig
from jaxspeed.moe.config import MoeConfig
from jaxspeed.moe.mos import KdConfig
from jaxspeed.optimizers.config import (
    HOST_UPDATE_OPTIMIZERS,
    ONEBIT_OPTIMIZERS,
    OPTIMIZERS,
    OptimConfig,
)
from jaxspeed.parallel.config import (
    ParallelConfig,
    PipelineConfig,
    SequenceParallelConfig,
    ZeroConfig,
)
from jaxspeed.parallel.mesh import DATA_AXES, resolve_mesh_shape
from jaxspeed.schema import Section, setting, to_config_dict

__all__ = ["ONEBIT_OPTIMIZERS", "OPTIMIZERS", "RLHF_STAGES", "Config", "check_override_keys",
           "config_warnings", "default_config", "validate", "validate_rlhf"]

RLHF_STAGES = ("pretrain", "sft", "reward", "ppo", "dpo", "grpo")
_WARNED: set[str] = set()  # config_warnings already logged by this process


@dataclasses.dataclass(frozen=True)
class Config(Section):
  """The run (its length, batch, logging) and every technique's section but ``rlhf``.

  Attributes:
    batch_size: global, in sequences.
    microbatches: gradient-accumulation steps per optimizer step; with
      parallel.stage > 1, the pipeline's microbatches (DeepSpeed's
      gradient_accumulation_steps in its PipelineEngine).
    max_consecutive_skips: the run stops after this many non-finite steps in a row.
    peak_flops: FLOP/s of all devices, for MFU; 0 = from the device kind
      (``jaxspeed.parallel.devices``).
    fit_parallel: a layout that does not fit the devices drops axes (tensor first) and
      fills data instead of failing; the chosen mesh is printed.
    sample_tokens: length of the text sample printed at the end; 0 to skip.
    init_params_from: a universal checkpoint or a run directory whose parameters start
      this run (at step 0, with this config's optimizer: fine-tuning); "" for a random
      initialization. Read only when the workdir has no checkpoint yet.
  """

  seed: int = setting(0)
  steps: int = setting(100, ge=1)
  batch_size: int = setting(16, ge=1)
  seq_len: int = setting(128, ge=1)
  microbatches: int = setting(1, ge=1)
  log_every: int = setting(10, ge=1)
  eval_every: int = setting(50, ge=1)
  eval_batches: int = setting(4, ge=1)
  checkpoint_every: int = setting(50, ge=1)
  keep_checkpoints: int = setting(3, ge=1)
  max_consecutive_skips: int = setting(20, ge=1)
  peak_flops: float = setting(0.0, ge=0)
  fit_parallel: bool = setting(False)
  sample_tokens: int = setting(64, ge=0)
  sample_prompt: str = setting("The ")
  init_params_from: str = setting("")
  model: ModelConfig = setting(factory=ModelConfig)
  optim: OptimConfig = setting(factory=OptimConfig)
  zero: ZeroConfig = setting(factory=ZeroConfig)
  parallel: ParallelConfig = setting(factory=ParallelConfig)
  pipeline: PipelineConfig = setting(factory=PipelineConfig)
  sequence_parallel: SequenceParallelConfig = setting(factory=SequenceParallelConfig)
  data_efficiency: DataEfficiencyConfig = setting(factory=DataEfficiencyConfig)
  compression: CompressionTrainingConfig = setting(factory=CompressionTrainingConfig)
  moe: MoeConfig = setting(factory=MoeConfig)
  kd: KdConfig = setting(factory=KdConfig)
  milo: MiloConfig = setting(factory=MiloConfig)
  inference: InferenceConfig = setting(factory=InferenceConfig)
  data: DataConfig = setting(factory=DataConfig)


def _rlhf_section() -> type[Section]:
  # Imported on use: jaxspeed.rlhf builds on jaxspeed.training, which imports this module.
  from jaxspeed.rlhf.config import RlhfConfig
  return RlhfConfig


def default_config() -> ml_collections.ConfigDict:
  """Every config key, with defaults for a tiny GPT on one CPU."""
  c = to_config_dict(Config)
  c.rlhf = to_config_dict(_rlhf_section())
  return c


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


def config_warnings(config: ml_collections.ConfigDict) -> list[str]:
  """Settings of an enabled technique that do nothing in this run (e.g. within ``config.steps``).

  DeepSpeed's defaults wait long before acting (``optim.freeze_step`` and
  ``optim.var_freeze_step`` 100000, activation quantization's
  ``schedule_offset`` 1000), so a short run with them never compresses or
  quantizes. Not errors: a run may be resumed past them.
  """
  steps, optim, comp = config.steps, config.optim, config.compression
  late = []
  if optim.name in ("onebit_adam", "onebit_lamb"):
    late.append(("optim.freeze_step", optim.freeze_step, "the warm-up never ends: no "
                 "update is compressed"))
  if optim.name == "zero_one_adam":
    late.append(("optim.var_freeze_step", optim.var_freeze_step, "the variance never "
                 "freezes: 0/1 Adam never skips a synchronization"))
  for section in ("weight_quantization", "activation_quantization", "sparse_pruning"):
    if comp[section].enabled:
      late.append((f"compression.{section}.schedule_offset", comp[section].schedule_offset,
                   f"{section.replace('_', ' ')} never switches on"))
  warnings = [f"config.{key}={value} >= steps={steps}: {why}"
              for key, value, why in late if value >= steps]
  if config.pipeline.schedule != "gpipe" and config.parallel.stage == 1:
    warnings.append(f"config.pipeline.schedule={config.pipeline.schedule!r} does nothing "
                    "without a pipeline (parallel.stage > 1)")
  return warnings


def _check_offload(config: ml_collections.ConfigDict) -> None:
  zero = config.zero
  if zero.offload_speculation and (zero.offload_optimizer == "none"
                                   or config.optim.name not in HOST_UPDATE_OPTIMIZERS):
    raise ConfigError("zero.offload_speculation", "speculates the optimizer update on the "
                      "host: it needs zero.offload_optimizer=host and optim.name in "
                      f"{', '.join(HOST_UPDATE_OPTIMIZERS)} (got {zero.offload_optimizer!r}, "
                      f"{config.optim.name!r}); allowed otherwise: False")


def _check_model(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  model, tp = config.model, shape["tensor"]
  if config.seq_len > model.max_seq_len:
    raise ConfigError("seq_len", f"{config.seq_len} exceeds model.max_seq_len="
                      f"{model.max_seq_len}")
  for key, value in (("num_heads", model.num_heads),
                     ("num_kv_heads", model.num_kv_heads or model.num_heads),
                     ("d_ff", model.d_ff), ("vocab_size", model.vocab_size)):
    if value % tp:
      raise ConfigError(f"model.{key}", f"{value} is not divisible by the tensor-parallel "
                        f"size parallel.tensor={tp}")
  dp = math.prod(shape[a] for a in DATA_AXES)
  if config.batch_size % (dp * config.microbatches):
    raise ConfigError("batch_size", f"{config.batch_size} is not divisible by data-parallel size "
                      f"(parallel.data x parallel.fsdp x parallel.expert = {dp}) x microbatches "
                      f"({config.microbatches})")


def _check_sequence_parallel(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  """DeepSpeed-Ulysses: heads split over tensor x sequence, sequence split over sequence."""
  sp, tp, model = shape["sequence"], shape["tensor"], config.model
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


def _check_data_efficiency(config: ml_collections.ConfigDict) -> None:
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
    if ltd.min_value > max_value:
      raise ConfigError("data_efficiency.random_ltd.min_value",
                        f"need min_value <= max_value, got {ltd.min_value} and {max_value}")
    if max_value > config.seq_len:
      raise ConfigError("data_efficiency.random_ltd.max_value", f"kept length {max_value} "
                        f"exceeds seq_len={config.seq_len}")
  if config.optim.lr_unit == "layer_tokens" and not ltd.enabled:
    raise ConfigError("optim.lr_unit", "'layer_tokens' counts random-LTD's layer-tokens; "
                      "enable data_efficiency.random_ltd or use 'steps' or 'tokens'")


def _check_pipeline(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  """A pipeline over ``parallel.stage``: layers split evenly (into p·v chunks if interleaved)."""
  stages, layers = shape["stage"], config.model.num_layers
  if stages > layers:
    raise ConfigError("parallel.stage", f"{stages} pipeline stages exceed model.num_layers="
                      f"{layers}; each stage needs at least one layer")
  if layers % stages:
    raise ConfigError("parallel.stage", f"model.num_layers={layers} does not split evenly "
                      f"into {stages} stages; use a divisor of {layers}")
  if stages > 1 and config.pipeline.schedule == "interleaved":
    chunks = stages * config.pipeline.virtual_stages
    if layers % chunks:
      raise ConfigError("pipeline.virtual_stages", f"model.num_layers={layers} does not split "
                        f"into {stages} stages x {config.pipeline.virtual_stages} virtual "
                        f"stages; p x v must divide {layers}")
    if config.microbatches % stages:
      raise ConfigError("microbatches", f"the interleaved schedule takes microbatches in "
                        f"groups of parallel.stage={stages}; got {config.microbatches}")
  moe = config.moe
  if stages > 1 and (moe.num_experts > 1 or any(e > 1 for e in moe.layer_num_experts)):
    # The stages stack their layers into one [p, L/p, ...] array per weight.
    if moe.expert_interval != 1:
      raise ConfigError("moe.expert_interval", f"a pipeline stacks its layers, so all must be "
                        f"alike: set moe.expert_interval=1 (every layer MoE), got "
                        f"{moe.expert_interval}")
    if len(set(moe.layer_num_experts)) > 1:
      raise ConfigError("moe.layer_num_experts", "a pipeline stacks its layers, so all must "
                        f"have the same expert count, got {list(moe.layer_num_experts)}")
    if shape["sequence"] > 1:
      raise ConfigError("parallel.sequence", "MoE layers inside pipeline stages do not run on "
                        f"sequence shards yet; set parallel.sequence=1, got {shape['sequence']}")


def _check_moe(config: ml_collections.ConfigDict, shape: dict[str, int]) -> None:
  moe, layers = config.moe, config.model.num_layers
  moe_layers = layers // moe.expert_interval
  counts = list(moe.layer_num_experts) or [moe.num_experts]
  if moe.layer_num_experts and len(counts) != moe_layers:
    raise ConfigError("moe.layer_num_experts", f"needs one expert count per MoE layer: "
                      f"{moe_layers} (model.num_layers={layers} // moe.expert_interval="
                      f"{moe.expert_interval}), got {len(counts)}")
  ep = shape["expert"]
  if max(counts) == 1:
    if ep > 1:
      raise ConfigError("parallel.expert", f"expert parallelism ({ep}) needs experts: set "
                        "moe.num_experts (or moe.layer_num_experts) above 1")
    return
  if moe_layers == 0:
    raise ConfigError("moe.expert_interval", f"{moe.expert_interval} exceeds model.num_layers="
                      f"{layers}, so no layer would be an MoE layer")
  if moe.top_k > min(counts):
    raise ConfigError("moe.top_k", f"{moe.top_k} exceeds the number of experts of a layer "
                      f"({min(counts)}); allowed: 1..{min(counts)}")
  tp = shape["tensor"]
  if moe.expert_d_ff % tp:
    raise ConfigError("moe.expert_d_ff", f"{moe.expert_d_ff} is not divisible by the "
                      f"tensor-parallel size parallel.tensor={tp}")
  bad = [e for e in counts if e % ep]
  if bad:
    key = "moe.layer_num_experts" if moe.layer_num_experts else "moe.num_experts"
    raise ConfigError(key, f"{bad[0]} experts are not divisible by the expert-parallel size "
                      f"parallel.expert={ep}")


def _check_inference(config: ml_collections.ConfigDict, num_devices: int) -> None:
  inf, model = config.inference, config.model
  if inf.kv_compression.policy == "minikv" and (model.d_model // model.num_heads) % 4:
    raise ConfigError("inference.kv_compression.policy", "minikv packs four 2-bit codes per "
                      "byte; the head dimension (model.d_model / model.num_heads) must be a "
                      "multiple of 4")
  if model.position == "learned" and inf.max_out_tokens > model.max_seq_len:
    raise ConfigError("inference.max_out_tokens", f"must be in [0, model.max_seq_len="
                      f"{model.max_seq_len}] with learned positions (0 = max_seq_len), "
                      f"got {inf.max_out_tokens}")
  tp = inf.tensor_parallel.tp_size
  if num_devices % tp:
    raise ConfigError("inference.tensor_parallel.tp_size", f"must divide the {num_devices} "
                      f"devices, got {tp}")
  for key in ("num_heads", "d_ff", "vocab_size"):
    if model[key] % tp:
      raise ConfigError("inference.tensor_parallel.tp_size", f"model.{key}={model[key]}"
                        f" is not divisible by tp_size={tp}")


def validate(config: ml_collections.ConfigDict, num_devices: int,
             rlhf: bool = False) -> dict[str, int]:
  """Checks every field; returns the resolved mesh shape.

  Each section checks its own fields, then the rules across sections, then
  the compatibility table (with ``rlhf``, for the RLHF steps). Settings that
  do nothing in this run (``config_warnings``) are logged once.

  Raises:
    ConfigError: naming the first bad key and the allowed values.
  """
  _check_keys(config, default_config())
  Config.from_config(config)
  _rlhf_section().from_config(config.rlhf)
  shape = resolve_mesh_shape(config.parallel, num_devices)
  _check_model(config, shape)
  _check_offload(config)
  check_compatibility(config, shape, rlhf=rlhf)
  _check_sequence_parallel(config, shape)
  _check_data_efficiency(config)
  _check_inference(config, num_devices)
  _check_pipeline(config, shape)
  _check_moe(config, shape)
  for warning in config_warnings(config):
    if warning not in _WARNED:
      _WARNED.add(warning)
      logging.warning("%s", warning)
  return shape


def validate_rlhf(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """``validate`` for the RLHF steps, plus the checks of ``config.rlhf`` against the rest.

  Raises:
    ConfigError: naming the first bad key and the allowed values.
  """
  shape = validate(config, num_devices, rlhf=True)
  rlhf = config.rlhf
  if rlhf.prompt_len + rlhf.answer_len > config.model.max_seq_len:
    raise ConfigError("rlhf.answer_len", f"prompt_len + answer_len = "
                      f"{rlhf.prompt_len + rlhf.answer_len} exceeds model.max_seq_len="
                      f"{config.model.max_seq_len}")
  dp = math.prod(shape[a] for a in DATA_AXES)
  for step in ("sft", "reward", "ppo", "dpo"):
    if rlhf[step].batch_size % dp:
      raise ConfigError(f"rlhf.{step}.batch_size", f"{rlhf[step].batch_size} is not divisible "
                        f"by the data-parallel size {dp}")
  if (rlhf.grpo.prompts * rlhf.grpo.group_size) % dp:
    raise ConfigError("rlhf.grpo.prompts", f"prompts x group_size = "
                      f"{rlhf.grpo.prompts * rlhf.grpo.group_size} is not divisible by the "
                      f"data-parallel size {dp}")
  return shape
