"""Checkpoints: a run directory's files, layout conversion on restore, the universal format.

* ``run_files``: the run directory (``config.json``, orbax checkpoints per step) and
  ``Checkpointer``, which restores a checkpoint into any layout of the same model;
* ``layout``: the rules that convert layout-dependent state (pipeline stacking,
  1-bit per-worker state) when a checkpoint is restored into another layout;
* ``universal``: ``export_universal`` / ``import_universal``, one full unsharded
  array per logical leaf, independent of any layout; ``load_params``, the
  parameters alone (of either kind of checkpoint) to start a fine-tuning run.
"""

from jaxspeed.checkpoint.layout import LayoutError
from jaxspeed.checkpoint.run_files import (
    CHECKPOINTS,
    CONFIG_FILE,
    Checkpointer,
    checkpoint_dir,
    flatten,
    has_checkpoint,
    load_run_config,
    restore_latest,
    save_run_config,
    saved_run_config,
    write_atomic,
)
from jaxspeed.checkpoint.universal import (
    check_params_source,
    export_universal,
    import_universal,
    load_params,
)

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "Checkpointer",
    "LayoutError",
    "check_params_source",
    "checkpoint_dir",
    "export_universal",
    "flatten",
    "has_checkpoint",
    "import_universal",
    "load_params",
    "load_run_config",
    "restore_latest",
    "save_run_config",
    "saved_run_config",
    "write_atomic",
]
