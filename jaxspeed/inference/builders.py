"""A ``Generator`` from a config and a training run's newest checkpoint."""

from __future__ import annotations

import string

import jax
import ml_collections

from jaxspeed.checkpoint import restore_latest
from jaxspeed.inference.config import InferenceConfig
from jaxspeed.inference.engine import Generator
from jaxspeed.inference.kv_policies import KvPolicyConfig, SlotPolicy
from jaxspeed.inference.minikv import MiniKVPolicy
from jaxspeed.inference.sampling import SamplingConfig
from jaxspeed.parallel import make_mesh
from jaxspeed.training.trainer import build


def load_params(config: ml_collections.ConfigDict, workdir: str):
  """(Setup, params) restored from the newest checkpoint in ``workdir``."""
  setup = build(config, workdir)
  with jax.set_mesh(setup.mesh):
    state = restore_latest(workdir, setup.abstract_state())
  return setup, state.params


def make_policy(config: KvPolicyConfig, cache_len: int) -> SlotPolicy | MiniKVPolicy | None:
  """The policy object ``Generator(policy=...)`` takes; None for the full cache."""
  if config.policy == "full":
    return None
  if config.policy == "minikv":
    return MiniKVPolicy(config, config.capacity(cache_len))
  return SlotPolicy(config, config.capacity(cache_len))


def kv_policy_config(config: ml_collections.ConfigDict, punct_ids=(), special_ids=()
                       ) -> KvPolicyConfig:
  return KvPolicyConfig(**config.inference.kv_compression.to_dict(),
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
  policy = make_policy(kv_policy_config(config, punct_ids), cache_len)
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
