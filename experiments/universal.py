"""Universal checkpoints: export a run's newest state independent of its layout, or import one.

  python -m experiments.universal --export --workdir=results/train \
      --universal_dir=results/train_universal
  python -m experiments.universal --import --universal_dir=results/train_universal \
      --workdir=results/resumed [--config=configs/gpt_tiny.py --config.parallel.stage=2]
  python -m experiments.train --config=configs/gpt_tiny.py --workdir=results/resumed \
      --config.parallel.stage=2 ...

The export holds one ``.npy`` file per parameter and optimizer moment (full,
unsharded, pipeline layers split back into ``layer_i``) and an ``index.json``
with shapes, dtypes, logical axes, the step, the run config and the data
position. An import writes a run directory that ``experiments.train`` resumes
under any layout of the same model and optimizer (and ``experiments.generate``
samples from). With ``--config``, the import first checks that the config
keeps the exported model and optimizer, as a resume would.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from experiments import common

EXPORT = flags.DEFINE_bool("export", False, "Export the newest checkpoint of --workdir.")
IMPORT = flags.DEFINE_bool("import", False, "Import --universal_dir into a new --workdir.")
WORKDIR = flags.DEFINE_string("workdir", None, "The run directory (exported, or created).")
UNIVERSAL_DIR = flags.DEFINE_string("universal_dir", None, "The universal checkpoint.")
CONFIG = config_flags.DEFINE_config_file(
    "config", None, "With --import: the config the imported run will train with, checked "
    "against the exported one.")


def main(argv):
  del argv
  from jaxspeed.errors import FlagError

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save and restore at INFO

  if EXPORT.value == IMPORT.value:
    raise FlagError("export", "give exactly one of --export and --import")
  for holder in (WORKDIR, UNIVERSAL_DIR):
    if not holder.value:
      raise FlagError(holder.name, "is required")
  common.setup_devices(1)
  from jaxspeed.checkpoint import export_universal, flatten, import_universal
  from jaxspeed.checkpoint.universal import read_index

  if EXPORT.value:
    index = export_universal(WORKDIR.value, UNIVERSAL_DIR.value)
    print(f"exported {WORKDIR.value} to {UNIVERSAL_DIR.value} ({index})")
    return
  if flags.FLAGS["config"].present:
    from jaxspeed.training.trainer import check_resume_compatible

    check_resume_compatible(flatten(read_index(UNIVERSAL_DIR.value)["config"]),
                            common.config_value(CONFIG))
  step = import_universal(UNIVERSAL_DIR.value, WORKDIR.value)
  print(f"imported step {step} into {WORKDIR.value}; continue with experiments.train "
        f"--workdir={WORKDIR.value} on any layout")


if __name__ == "__main__":
  common.run_app(main)
