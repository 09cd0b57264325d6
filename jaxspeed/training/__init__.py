"""Training: state and ZeRO shardings, optimizers, the jitted step, the loop."""

from jaxspeed.training.metrics import MetricsWriter, plot_loss, plot_runs, read_metrics
from jaxspeed.training.optim import decay_mask, make_optimizer, make_schedule
from jaxspeed.training.state import (
    StateSpecs,
    TrainState,
    abstract_state,
    init_state,
    state_specs,
)
from jaxspeed.training.step import (
    CustomObjective,
    KnowledgeDistillation,
    LanguageModeling,
    LayerDropping,
    StepOptions,
    batch_sharding,
    cross_entropy,
    make_eval_step,
    make_train_step,
    split_microbatches,
)
from jaxspeed.training.trainer import Setup, build, evaluate, train

__all__ = [
    "CustomObjective",
    "KnowledgeDistillation",
    "LanguageModeling",
    "LayerDropping",
    "MetricsWriter",
    "Setup",
    "StateSpecs",
    "StepOptions",
    "TrainState",
    "abstract_state",
    "batch_sharding",
    "build",
    "cross_entropy",
    "decay_mask",
    "evaluate",
    "init_state",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "plot_loss",
    "plot_runs",
    "read_metrics",
    "split_microbatches",
    "state_specs",
    "train",
]
