"""8 virtual CPU devices for every test, set before JAX initializes."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
  """A GPT small enough to compile and train 10 steps in a couple of seconds."""
  from jaxspeed.config import default_config

  c = default_config()
  c.steps = 10
  c.batch_size = 16
  c.seq_len = 32
  c.log_every = 5
  c.eval_every = 10
  c.eval_batches = 1
  c.checkpoint_every = 5
  c.sample_tokens = 0
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.d_model = 64
  c.model.d_ff = 256
  c.model.max_seq_len = 32
  c.optim.warmup = 2
  return c
