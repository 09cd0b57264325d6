"""DeepSpeed-MoE (top-k gating, expert-parallel MoE layers, PR-MoE, Residual-MoE, MoS), with
DeepSeek-MoE's experts and balancing and X-MoE's dispatch."""

from jaxspeed.moe.balancing import BALANCING
from jaxspeed.moe.config import DISPATCHES, NOISY_GATE_POLICIES, RESIDUAL_MIXES, MoeConfig
from jaxspeed.moe.dropless import dropless_experts
from jaxspeed.moe.expert_parallel import (
    expert_parallel_dropless,
    expert_parallel_experts,
    expert_parallel_size,
)
from jaxspeed.moe.experts import ExpertWeights, capacity_experts, grouped_mlp
from jaxspeed.moe.gating import (
    DROP_POLICIES,
    Routing,
    capacity,
    dispatch_and_combine,
    route,
    top1_gating,
    top2_gating,
    topk_gating,
)
from jaxspeed.moe.layer import MoeMlp
from jaxspeed.moe.mos import Distillation, kd_loss_sum
from jaxspeed.moe.params import param_counts

__all__ = [
    "BALANCING",
    "DISPATCHES",
    "DROP_POLICIES",
    "NOISY_GATE_POLICIES",
    "RESIDUAL_MIXES",
    "Distillation",
    "ExpertWeights",
    "MoeConfig",
    "MoeMlp",
    "Routing",
    "capacity",
    "capacity_experts",
    "dispatch_and_combine",
    "dropless_experts",
    "expert_parallel_dropless",
    "expert_parallel_experts",
    "expert_parallel_size",
    "grouped_mlp",
    "kd_loss_sum",
    "param_counts",
    "route",
    "top1_gating",
    "top2_gating",
    "topk_gating",
]
