"""The main job: train a model from a config file, with every field overridable.

  python -m experiments.train --config=configs/gpt_tiny.py --workdir=results/demo \
      --config.steps=50 --config.parallel.tensor=2 --config.zero.stage=3

Multi-process (one process per host; see experiments/launch_local.py):
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from experiments import common

CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt_tiny.py", "Config file.")
WORKDIR = flags.DEFINE_string("workdir", "results/train", "Checkpoints, metrics and plots.")
COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "host:port of process 0 for multi-process runs.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    # A failed save stops the run with one line naming the error; orbax's tracebacks of
    # it (several threads each log one) show with --verbosity.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno < std_logging.ERROR or "/orbax/" not in record.pathname)
  common.setup_devices()
  import jax

  import jaxspeed
  from jaxspeed.training.trainer import SaveFailed

  if COORDINATOR.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(COORDINATOR.value, num_processes=NUM_PROCESSES.value,
                               process_id=PROCESS_ID.value)
  # Bad input and stopped runs become one line in common.run_app.
  try:
    jaxspeed.train(common.config_value(CONFIG), WORKDIR.value)
  except SaveFailed as e:
    if jax.process_count() == 1:
      raise
    # Orbax's threads of the failed save wait for the others at a barrier until its
    # timeout; a normal exit would join them.
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
  common.run_app(main)
