"""Curricula, random-LTD and PLD wired through the config, the trainer and checkpoints."""

import os

import numpy as np
import pytest

import jaxspeed
from jaxspeed.errors import ConfigError
from jaxspeed.models.random_ltd import layer_tokens
from jaxspeed.training import read_metrics


def _compose(config):
  """Sequence lengths 16 then 32, random-LTD keeping 8, PLD, 1-bit Adam and ZeRO-1."""
  config.model.num_layers = 3
  config.steps = 4
  config.log_every = 1
  de = config.data_efficiency
  de.seqlen.update(enabled=True, schedule_type="fixed_discrete", difficulties=[16, 32],
                   max_steps=[2], min_difficulty=16, max_difficulty=32)
  de.random_ltd.update(enabled=True, min_value=8, max_value=8, require_steps=4, seq_per_step=8)
  de.pld.update(enabled=True, theta=0.5, gamma=0.1)
  config.optim.update(name="onebit_adam", freeze_step=2, lr_unit="layer_tokens")
  config.zero.stage = 1
  return config


def test_everything_composes_in_one_run_with_one_compilation_per_kind(tiny_config, tmp_path):
  config = _compose(tiny_config)
  summary = jaxspeed.train(config, str(tmp_path))
  records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["seq_len"] for r in records] == [16, 16, 32, 32]
  assert summary["train_step_compilations"] == 2  # (warmup, len 16) and (compressed, len 32)
  assert summary["tokens_seen"] == 16 * (16 + 16 + 32 + 32)
  assert np.isfinite(summary["val_loss"]) and summary["val_loss"] < summary["initial_val_loss"]


def test_layer_token_schedule_counts_kept_tokens(tiny_config):
  config = _compose(tiny_config)
  setup = jaxspeed.build(config)
  # Every step: 16 rows; first and last layers see all tokens, the middle one 8.
  expected = sum(16 * layer_tokens(8, s, 3) for s in (16, 16, 32, 32))
  from jaxspeed.training.trainer import _schedule_length, layer_dropping
  assert _schedule_length(config, setup.train_data, layer_dropping(config)) == expected
  assert layer_tokens(8, 32, 3) == 2 * 32 + 8


def test_curriculum_run_resumes_with_the_same_batches(tiny_config, tmp_path):
  config = tiny_config
  config.steps = 6
  config.log_every = 1
  config.checkpoint_every = 3
  config.optim.decay = 6
  de = config.data_efficiency
  de.curriculum.update(enabled=True, total_curriculum_step=6, min_difficulty=20)
  de.seqlen.update(enabled=True, min_difficulty=16, max_difficulty=32, total_curriculum_step=4,
                   difficulty_step=16)
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  jaxspeed.train(config, straight)
  config.steps = 3
  jaxspeed.train(config, split)
  config.steps = 6
  jaxspeed.train(config, split)
  read = lambda d: {r["step"]: r["loss"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))}
  expected, resumed = read(straight), read(split)
  assert [resumed[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]
  assert os.path.exists(os.path.join(straight, "data_analysis", "vocab_rarity_index_to_sample.npy"))


@pytest.mark.parametrize("overrides,key", [
    ({"seqlen.enabled": True, "seqlen.min_difficulty": 64, "seqlen.max_difficulty": 16},
     "data_efficiency.seqlen.min_difficulty"),
    ({"seqlen.enabled": True, "seqlen.schedule_type": "cosine", "seqlen.max_difficulty": 32},
     "data_efficiency.seqlen.schedule_type"),
    ({"seqlen.enabled": True, "seqlen.max_difficulty": 64},
     "data_efficiency.seqlen.max_difficulty"),
    ({"random_ltd.enabled": True}, "data_efficiency.random_ltd.enabled"),  # 2 layers
    ({"random_ltd.enabled": True, "random_ltd.max_value": 64, "layers": 3},
     "data_efficiency.random_ltd.max_value"),
    ({"curriculum.enabled": True, "curriculum.metric": "perplexity"},
     "data_efficiency.curriculum.metric"),
    ({"pld.enabled": True, "pld.theta": 0.0}, "data_efficiency.pld.theta"),
    ({"lr_unit": "layer_tokens"}, "optim.lr_unit"),
])
def test_bad_data_efficiency_configs_are_rejected(tiny_config, overrides, key):
  overrides = dict(overrides)
  tiny_config.model.num_layers = overrides.pop("layers", 2)
  if "lr_unit" in overrides:
    tiny_config.optim.lr_unit = overrides.pop("lr_unit")
  for path, value in overrides.items():
    section, name = path.split(".")
    tiny_config.data_efficiency[section][name] = value
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    jaxspeed.build(tiny_config)
