"""The demo: a small byte-level GPT on Python's own docs and sources.

On the 8 virtual CPU devices of ``experiments.train`` it uses three parallel
axes at once: data=2 x fsdp=2 (ZeRO-3) x tensor=2. On other device counts
(one GPU, four TPU cores) ``fit_parallel`` drops tensor, then fsdp, until the
layout fits, fills data with the rest, and prints the mesh it chose.
"""

from jaxspeed.config import default_config


def get_config():
  config = default_config()
  config.steps = 300
  config.batch_size = 16
  config.seq_len = 128
  config.log_every = 25
  config.eval_every = 100
  config.eval_batches = 4
  config.checkpoint_every = 100

  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.d_model = 128
  config.model.d_ff = 512
  config.model.max_seq_len = 128

  config.optim.name = "adamw"
  config.optim.learning_rate = 3e-3
  config.optim.warmup = 30

  config.zero.stage = 3
  config.parallel.data = 2
  config.parallel.fsdp = 2
  config.parallel.tensor = 2
  config.fit_parallel = True
  return config
