"""GPT-3 XL shapes (1.3B parameters; Brown et al. 2020, table 2.1).

Too big to train on a CPU; used to check shapes, parameter counts and
per-device memory from abstract (never allocated) arrays.
"""

from jaxspeed.config import default_config


def get_config():
  config = default_config()
  config.batch_size = 512
  config.seq_len = 2048
  config.model.update(num_layers=24, num_heads=16, d_model=2048, d_ff=8192,
                      vocab_size=50304, max_seq_len=2048, tie_embeddings=True)
  config.optim.learning_rate = 2e-4
  config.zero.stage = 3
  config.parallel.fsdp = -1
  config.parallel.data = 1
  return config
