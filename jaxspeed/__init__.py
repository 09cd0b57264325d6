"""jaxspeed: DeepSpeed's techniques as composable, pure-functional JAX.

Library use, in a few calls::

  import jaxspeed
  config = jaxspeed.default_config()
  setup = jaxspeed.build(config)          # mesh, data, model, optimizer, steps
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    state, metrics = setup.train_step(state, setup.to_device(setup.train_data.next_batch()))

or the whole loop with checkpoints and logging: ``jaxspeed.train(config, workdir)``.
"""

from jaxspeed.checkpoint import Checkpointer
from jaxspeed.config import default_config, validate
from jaxspeed.errors import ConfigError
from jaxspeed.inference import Generator, SamplingConfig
from jaxspeed.models import GPT, BertEncoder, BertForMaskedLM, ModelConfig, build_model
from jaxspeed.parallel import MESH_AXES, make_mesh, use_cpu_devices
from jaxspeed.training import (
    Setup,
    TrainState,
    build,
    evaluate,
    init_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    state_specs,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "MESH_AXES",
    "BertEncoder",
    "BertForMaskedLM",
    "Checkpointer",
    "ConfigError",
    "Generator",
    "ModelConfig",
    "SamplingConfig",
    "Setup",
    "TrainState",
    "build",
    "build_model",
    "default_config",
    "evaluate",
    "init_state",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "state_specs",
    "train",
    "use_cpu_devices",
    "validate",
]
