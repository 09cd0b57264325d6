"""8 virtual CPU devices for every test, set before JAX initializes.

XLA compiles at LLVM optimization level 0 with its elemental (pre-MLIR) fusion
emitters (``FAST_COMPILE``), also in the subprocesses the tests start.

Compiled programs are shared through a persistent compilation cache that starts
empty in each run (under pytest's temporary directory): a program that several
tests compile, such as the single-device reference of ``tiny_config``, compiles
once per run, for both xdist workers and for the experiments run in a subprocess.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

# LLVM's optimization level 0 compiles the suite's many tiny programs about twice as fast,
# and XLA:CPU's elemental fusion emitters take about a third less time again than the MLIR
# fusion emitters (the default); they run a few steps each, so the slower code costs far less
# than it saves. For subprocesses: helpers.subprocess_env.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8", FAST_COMPILE])
jax.config.update("jax_num_cpu_devices", 8)
jax.devices()  # XLA reads XLA_FLAGS here (not at import), once per process
# Child processes inherit the flags without the fast-compile one.
os.environ["XLA_FLAGS"] = os.environ["XLA_FLAGS"].replace(" " + FAST_COMPILE, "")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin
def pytest_configure(config):
  base = config._tmp_path_factory.getbasetemp()
  # xdist workers get <basetemp>/popen-gwN: share the parent between them.
  root = base.parent if base.name.startswith("popen-gw") else base
  cache = str(root / "xla_cache")
  os.makedirs(cache, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_collection_modifyitems(items):
  """Tests marked ``slow`` first: the longest start early, so both xdist workers end together."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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
