"""Layout planner: choose a parallel layout for N devices from compiled programs, without the
devices (``enumerate_layouts`` -> ``measure`` -> ``predict``)."""

from jaxspeed.planner.compiled import Cache, Compiled, compile_step, measure
from jaxspeed.planner.cost import (
    NoLayoutFits,
    Prediction,
    StepCosts,
    collective_axes,
    predict,
    rank,
    step_costs,
)
from jaxspeed.planner.hardware import PROFILES, Hardware, calibrate_cpu
from jaxspeed.planner.layouts import Layout, apply_layout, enumerate_layouts, factorizations

__all__ = [
    "PROFILES",
    "Cache",
    "Compiled",
    "Hardware",
    "Layout",
    "NoLayoutFits",
    "Prediction",
    "StepCosts",
    "apply_layout",
    "calibrate_cpu",
    "collective_axes",
    "compile_step",
    "enumerate_layouts",
    "factorizations",
    "measure",
    "predict",
    "rank",
    "step_costs",
]
