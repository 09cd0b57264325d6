"""A ``Generator`` from a config and a training run's newest checkpoint."""

from __future__ import annotations

import json
import os
import string

import jax
import ml_collections

from jaxspeed.checkpoint import Checkpointer
from jaxspeed.errors import ConfigError
from jaxspeed.inference.compression import CompressionConfig, make_policy
from jaxspeed.inference.config import InferenceConfig
from jaxspeed.inference.engine import Generator
from jaxspeed.inference.sampling import SamplingConfig
from jaxspeed.parallel import make_mesh

CONFIG_FILE = "config.json"


def save_run_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the training config next to the checkpoints, for ``load_run_config``."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json(indent=2))


def load_run_config(workdir: str, defaults: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` trained with; ``defaults`` fills keys it lacks."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError("workdir", f"{path} not found; train with experiments.train first")
  config = defaults.copy_and_resolve_references()
  with open(path) as f:
    saved = json.load(f)
  saved.pop("inference", None)  # generation settings come from the caller
  config.update_from_flattened_dict(_flatten(saved))
  return config


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
  return out


def load_params(config: ml_collections.ConfigDict, workdir: str):
  """(Setup, params) restored from the newest checkpoint in ``workdir``."""
  from jaxspeed.training.trainer import build  # the trainer imports this package

  setup = build(config, workdir)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = checkpointer.latest_step()
  if step is None:
    raise ConfigError("workdir", f"no checkpoint in {workdir}/checkpoints")
  with jax.set_mesh(setup.mesh):
    state, _ = checkpointer.restore(step, setup.abstract_state())
  checkpointer.close()
  return setup, state.params


def compression_config(config: ml_collections.ConfigDict, punct_ids=(), special_ids=()
                       ) -> CompressionConfig:
  return CompressionConfig(**config.inference.kv_compression.to_dict(),
                           punct_ids=tuple(punct_ids), special_ids=tuple(special_ids))


def sampling_config(config: ml_collections.ConfigDict) -> SamplingConfig:
  return InferenceConfig.from_config(config.inference).sampling


def stop_tokens(config: ml_collections.ConfigDict) -> list[int]:
  return list(InferenceConfig.from_config(config.inference).stop_token_ids)


def generator_from_config(config: ml_collections.ConfigDict, model, params, *,
                          punct_ids=(), devices=None) -> Generator:
  """A Generator on ``inference.tensor_parallel.tp_size`` devices with the configured policy."""
  devices = jax.devices() if devices is None else devices
  tp = config.inference.tensor_parallel.tp_size
  mesh = make_mesh({"tensor": tp}, devices[:tp]) if tp > 1 else None
  cache_len = config.inference.max_out_tokens or config.model.max_seq_len
  policy = make_policy(compression_config(config, punct_ids), cache_len)
  return Generator(model, params, cache_len=cache_len, mesh=mesh, policy=policy)


def punctuation_ids(tokenizer) -> list[int]:
  """Ids whose text is only punctuation or line breaks (FastGen's punctuation tokens)."""
  marks = set(string.punctuation) | {"\n"}
  ids = []
  for i in range(tokenizer.vocab_size):
    text = tokenizer.decode([i]).strip(" ")
    if text and set(text) <= marks:
      ids.append(i)
  return ids
