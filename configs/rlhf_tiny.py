"""RLHF on CPU in minutes: pre-train a byte-level GPT on Python's docs, then SFT, reward, PPO.

``python -m experiments.rlhf --config=configs/rlhf_tiny.py`` runs every step;
the training sharding is data=2 x fsdp=2 x tensor=2 with ZeRO-3, so the
hybrid engine really regathers the actor for generation.
"""

from jaxspeed.config import default_config


def get_config():
  config = default_config()
  # Pre-training (the ordinary trainer).
  config.steps = 400
  config.batch_size = 32
  config.seq_len = 128
  config.log_every = 50
  config.eval_every = 200
  config.checkpoint_every = 400
  config.sample_tokens = 0
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.d_model = 128
  config.model.d_ff = 512
  config.model.max_seq_len = 128
  config.optim.learning_rate = 3e-3
  config.optim.warmup = 30
  config.zero.stage = 3
  config.parallel.data = 2
  config.parallel.fsdp = 2
  config.parallel.tensor = 2
  return config
