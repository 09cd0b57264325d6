"""Which techniques cannot run together: one table, checked once by ``jaxspeed.config.validate``.

A technique is on when its predicate over the config (and the resolved mesh
shape) holds; ``COMPATIBILITY[(a, b)]`` says why ``a`` and ``b`` do not run
together, and the error names ``b``'s key, the one to change.
``compatibility_markdown()`` renders the table for the README.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import ml_collections

from jaxspeed.errors import ConfigError
from jaxspeed.optimizers.config import ONEBIT_OPTIMIZERS

Predicate = Callable[[ml_collections.ConfigDict, Mapping[str, int], bool], bool]


def _has_experts(config: ml_collections.ConfigDict) -> bool:
  return max([*config.moe.layer_num_experts, config.moe.num_experts]) > 1


def _compression(section: str) -> Predicate:
  return lambda c, shape, rlhf: c.compression[section].enabled


@dataclasses.dataclass(frozen=True)
class Technique:
  """Attributes:
    key: the config key that switches it on, named in the error ("" for none).
    when: when it is on, as the README shows it.
    on: the predicate over (config, mesh shape, RLHF step).
    off: the values of ``key`` that switch it off, for the error message.
  """

  key: str
  when: str
  on: Predicate
  off: str = "False"


TECHNIQUES: dict[str, Technique] = {
    "1-bit optimizer": Technique(
        "optim.name", "`optim.name` in " + ", ".join(ONEBIT_OPTIMIZERS),
        lambda c, shape, rlhf: c.optim.name in ONEBIT_OPTIMIZERS, "adamw, adam, lamb, sgd"),
    "ZeRO-2/3": Technique("zero.stage", "`zero.stage` >= 2",
                          lambda c, shape, rlhf: c.zero.stage > 1, "0, 1"),
    "optimizer offload": Technique("zero.offload_optimizer", "`zero.offload_optimizer` = host",
                                   lambda c, shape, rlhf: c.zero.offload_optimizer != "none",
                                   "none"),
    "parameter offload": Technique("zero.offload_params", "`zero.offload_params` = host",
                                   lambda c, shape, rlhf: c.zero.offload_params != "none",
                                   "none"),
    "ZeRO++ qwZ": Technique("zero.quantized_weights", "`zero.quantized_weights`",
                            lambda c, shape, rlhf: c.zero.quantized_weights),
    "ZeRO++ hpZ": Technique("zero.hpz_partition_size", "`zero.hpz_partition_size` > 1",
                            lambda c, shape, rlhf: c.zero.hpz_partition_size > 1, "1"),
    "ZeRO++ qgZ": Technique("zero.quantized_gradients", "`zero.quantized_gradients`",
                            lambda c, shape, rlhf: c.zero.quantized_gradients),
    "explicit reduce-scatter": Technique("zero.reduce_scatter", "`zero.reduce_scatter`",
                                         lambda c, shape, rlhf: c.zero.reduce_scatter),
    "low-precision parameters": Technique(
        "model.param_dtype", "`model.param_dtype` = bfloat16",
        lambda c, shape, rlhf: c.model.param_dtype != "float32", "float32"),
    "pipeline": Technique("parallel.stage", "`parallel.stage` > 1",
                          lambda c, shape, rlhf: shape["stage"] > 1, "1"),
    "1F1B schedule": Technique("pipeline.schedule", "`pipeline.schedule` = 1f1b",
                               lambda c, shape, rlhf: shape["stage"] > 1
                               and c.pipeline.schedule == "1f1b", "gpipe"),
    "sequence parallelism": Technique("parallel.sequence", "`parallel.sequence` > 1",
                                      lambda c, shape, rlhf: shape["sequence"] > 1, "1"),
    "expert parallelism": Technique("parallel.expert", "`parallel.expert` > 1",
                                    lambda c, shape, rlhf: shape["expert"] > 1, "1"),
    "MoE": Technique("moe.num_experts", "`moe.num_experts` or `moe.layer_num_experts` > 1",
                     lambda c, shape, rlhf: _has_experts(c), "1"),
    "MoE bias balancing": Technique(
        "moe.balancing", "`moe.balancing` = bias with experts",
        lambda c, shape, rlhf: _has_experts(c) and c.moe.balancing == "bias", "aux_loss, none"),
    "BERT": Technique("model.name", "`model.name` = bert",
                      lambda c, shape, rlhf: c.model.name == "bert", "'gpt'"),
    "dropout": Technique("model.dropout", "`model.dropout` > 0",
                         lambda c, shape, rlhf: c.model.dropout > 0, "0"),
    "sequence padding": Technique("sequence_parallel.pad", "`sequence_parallel.pad`",
                                  lambda c, shape, rlhf: c.sequence_parallel.pad),
    "sequence-length curriculum": Technique(
        "data_efficiency.seqlen.enabled", "`data_efficiency.seqlen.enabled`",
        lambda c, shape, rlhf: c.data_efficiency.seqlen.enabled),
    "curriculum sampling": Technique(
        "data_efficiency.curriculum.enabled", "`data_efficiency.curriculum.enabled`",
        lambda c, shape, rlhf: c.data_efficiency.curriculum.enabled),
    "random-LTD": Technique("data_efficiency.random_ltd.enabled",
                            "`data_efficiency.random_ltd.enabled`",
                            lambda c, shape, rlhf: c.data_efficiency.random_ltd.enabled),
    "PLD": Technique("data_efficiency.pld.enabled", "`data_efficiency.pld.enabled`",
                     lambda c, shape, rlhf: c.data_efficiency.pld.enabled),
    "weight quantization": Technique("compression.weight_quantization.enabled",
                                     "`compression.weight_quantization.enabled`",
                                     _compression("weight_quantization")),
    "activation quantization": Technique("compression.activation_quantization.enabled",
                                         "`compression.activation_quantization.enabled`",
                                         _compression("activation_quantization")),
    "sparse pruning": Technique("compression.sparse_pruning.enabled",
                                "`compression.sparse_pruning.enabled`",
                                _compression("sparse_pruning")),
    "KD": Technique("kd.enabled", "`kd.enabled`", lambda c, shape, rlhf: c.kd.enabled),
    "adversarial embedding noise": Technique(
        "optim.adversarial.epsilon", "`optim.adversarial.epsilon` > 0",
        lambda c, shape, rlhf: c.optim.adversarial.epsilon > 0, "0"),
    "RLHF": Technique("", "`experiments.rlhf` steps", lambda c, shape, rlhf: rlhf),
}

_ONEBIT_EXCHANGE = ("a 1-bit optimizer exchanges each worker's compressed momentum or update "
                    "instead of reducing gradients")
# The explicit reduce-scatter, qwZ and hpZ compute each gradient per data-parallel device.
_PER_DEVICE_EXPERTS = ("the experts' all-to-all runs over a data axis, which the per-device "
                       "gradient computation makes manual")
_PER_DEVICE_OFFLOAD = ("with the update on the host, gradients stream to host memory block by "
                       "block instead of being reduced per device")
_RLHF_AXES = "the RLHF steps train on the data / fsdp / tensor axes (ZeRO and tensor parallelism)"

COMPATIBILITY: dict[tuple[str, str], str] = {
    ("1-bit optimizer", "explicit reduce-scatter"): _ONEBIT_EXCHANGE,
    ("1-bit optimizer", "ZeRO++ qwZ"): _ONEBIT_EXCHANGE,
    ("1-bit optimizer", "ZeRO++ hpZ"): _ONEBIT_EXCHANGE,
    ("1-bit optimizer", "ZeRO++ qgZ"): _ONEBIT_EXCHANGE,
    ("BERT", "sequence padding"): "padding is invisible only to a causal model",
    ("sequence parallelism", "1-bit optimizer"): "a 1-bit optimizer compresses whole-model "
                                                 "updates; it is not sharded over the sequence",
    ("sequence parallelism", "random-LTD"): "random-LTD's kept tokens are not split over "
                                            "parallel.sequence",
    ("pipeline", "BERT"): "the pipeline runs the GPT decoder",
    ("pipeline", "1-bit optimizer"): "1-bit optimizers do not run with a pipeline yet",
    ("pipeline", "random-LTD"): "random-LTD does not run in a pipeline yet",
    ("pipeline", "PLD"): "progressive layer dropping does not run in a pipeline yet",
    ("pipeline", "weight quantization"): "compression does not run in a pipeline yet",
    ("pipeline", "activation quantization"): "compression does not run in a pipeline yet",
    ("pipeline", "sparse pruning"): "compression does not run in a pipeline yet",
    ("pipeline", "low-precision parameters"): "low-precision parameters do not run in a "
                                              "pipeline yet",
    ("BERT", "MoE"): "MoE layers are built into the GPT decoder",
    ("expert parallelism", "1-bit optimizer"): "a 1-bit optimizer compresses whole-model "
                                               "gradients per data-parallel worker",
    ("MoE", "PLD"): "progressive layer dropping skips layers inside a conditional, where MoE "
                    "statistics cannot be collected",
    ("pipeline", "expert parallelism"): "the experts' all-to-all is a shard_map of its own, "
                                        "which does not lower inside a stage's shard_map yet",
    ("pipeline", "MoE bias balancing"): "the routing bias is moved in the plain layers' "
                                        "parameters, not in the stages' stacked ones",

    ("pipeline", "adversarial embedding noise"): "the pipeline computes its loss inside the "
                                                 "stages; the ascent needs the whole forward",
    ("RLHF", "adversarial embedding noise"): "the RLHF learners build their own objectives",
    ("1-bit optimizer", "MoE bias balancing"): "the routing bias is moved in the parameters "
                                               "only, not in the 1-bit optimizers' own copies",
    ("optimizer offload", "MoE bias balancing"): "the routing bias is moved on the device, not "
                                                 "in master weights held in host memory",
    ("RLHF", "MoE bias balancing"): "the RLHF steps do not move the routing bias",
    ("BERT", "KD"): "MoS distillation trains a GPT student",
    ("1F1B schedule", "KD"): "MoS distillation reads the student's logits, which 1F1B keeps "
                             "inside the last stage",
    ("BERT", "sequence-length curriculum"): "the curricula feed the GPT trainer; BERT runs "
                                            "random-LTD or PLD",
    ("BERT", "curriculum sampling"): "the curricula feed the GPT trainer; BERT runs random-LTD "
                                     "or PLD",
    ("RLHF", "BERT"): "the RLHF steps train a GPT",
    ("RLHF", "pipeline"): _RLHF_AXES,
    ("RLHF", "expert parallelism"): _RLHF_AXES,
    ("RLHF", "sequence parallelism"): _RLHF_AXES,
    ("RLHF", "1-bit optimizer"): "the RLHF steps use optax optimizers",
    ("RLHF", "optimizer offload"): "the RLHF steps keep the optimizer state in device memory",
    ("RLHF", "parameter offload"): "the RLHF steps keep the parameters in device memory",
    ("RLHF", "ZeRO++ qwZ"): "the RLHF steps gather the parameters exactly",
    ("RLHF", "low-precision parameters"): "the RLHF steps keep float32 parameters",
    ("RLHF", "explicit reduce-scatter"): "the RLHF losses normalize over the whole batch, "
                                         "not per device",
    ("RLHF", "ZeRO++ hpZ"): "the RLHF steps gather the parameters exactly",
    ("RLHF", "ZeRO++ qgZ"): "the RLHF steps reduce the gradients exactly",
    ("expert parallelism", "ZeRO++ qgZ"): _PER_DEVICE_EXPERTS,
    ("optimizer offload", "ZeRO++ qgZ"): _PER_DEVICE_OFFLOAD,
    ("parameter offload", "ZeRO++ qgZ"): "the per-device gradient computation reads the "
                                         "parameters in device memory",
    ("expert parallelism", "explicit reduce-scatter"): _PER_DEVICE_EXPERTS,
    ("expert parallelism", "ZeRO++ qwZ"): _PER_DEVICE_EXPERTS,
    ("expert parallelism", "ZeRO++ hpZ"): _PER_DEVICE_EXPERTS,
    ("optimizer offload", "explicit reduce-scatter"): _PER_DEVICE_OFFLOAD,
    ("optimizer offload", "ZeRO++ qwZ"): _PER_DEVICE_OFFLOAD,
    ("optimizer offload", "ZeRO++ hpZ"): _PER_DEVICE_OFFLOAD,
    ("parameter offload", "explicit reduce-scatter"): "the per-device gradient computation "
                                                      "reads the parameters in device memory",
    ("parameter offload", "ZeRO++ hpZ"): "the per-device gradient computation reads the "
                                         "parameters in device memory",
    ("1-bit optimizer", "low-precision parameters"): "the 1-bit optimizers update the "
                                                     "parameters themselves, without a float32 "
                                                     "master copy",
}


def _setting(config: ml_collections.ConfigDict, key: str) -> str:
  value = config
  for part in key.split("."):
    value = value[part]
  return f"{key}={value!r}"


def check_compatibility(config: ml_collections.ConfigDict, shape: Mapping[str, int],
                        rlhf: bool = False) -> None:
  """Raises ``ConfigError`` for the first pair of the table that is on together.

  Args:
    config: a config whose sections passed their own checks.
    shape: the resolved mesh shape.
    rlhf: the config runs an RLHF step.
  """
  on = {name: t.on(config, shape, rlhf) for name, t in TECHNIQUES.items()}
  for (a, b), why in COMPATIBILITY.items():
    if on[a] and on[b]:
      first = TECHNIQUES[a].key
      with_ = f"{a} ({_setting(config, first)})" if first else a
      raise ConfigError(TECHNIQUES[b].key, f"{b} does not run with {with_}: {why}; "
                        f"allowed: {TECHNIQUES[b].off}")


def compatibility_markdown() -> str:
  """The README's tables: when each technique is on, then one row per incompatible pair."""
  used = {name for pair in COMPATIBILITY for name in pair}
  rows = ["| Technique | On when |", "| --- | --- |"]
  rows += [f"| {name} | {t.when} |" for name, t in TECHNIQUES.items() if name in used]
  rows += ["", "| Technique | Does not run with (the key an error names) | Why |",
           "| --- | --- | --- |"]
  for (a, b), why in COMPATIBILITY.items():
    rows.append(f"| {a} | {b} (`{TECHNIQUES[b].key}`) | {why} |")
  return "\n".join(rows) + "\n"
