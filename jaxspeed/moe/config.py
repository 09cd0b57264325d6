"""``config.moe``: the MoE hyperparameters, one frozen dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxspeed.errors import ConfigError
from jaxspeed.moe.balancing import BALANCING
from jaxspeed.moe.gating import DROP_POLICIES
from jaxspeed.moe.layer import MoeFeedForward
from jaxspeed.schema import Section, setting

NOISY_GATE_POLICIES = ("none", "Jitter", "RSample")
DISPATCHES = ("exact", "padding_free")
RESIDUAL_MIXES = ("sum", "learned")


@dataclasses.dataclass(frozen=True)
class MoeConfig(Section):
  """DeepSpeed ``MoE(...)`` arguments plus Megatron-DeepSpeed's layer placement.

  Attributes:
    num_experts: experts of every MoE layer; 1 means no MoE (a dense model).
    layer_num_experts: PR-MoE's pyramid, one expert count per MoE layer
      (overrides ``num_experts``); empty for the same count everywhere.
    expert_interval: every ``expert_interval``-th layer (layers i with
      (i + 1) % interval == 0) is an MoE layer.
    top_k: experts per token.
    capacity_factor, eval_capacity_factor: cf in C = ⌈S/E · cf · k⌉ in
      training and in evaluation.
    min_capacity: lower bound of C.
    noisy_gate_policy: ``none``, ``Jitter`` (gate input × U(0.99, 1.01)) or
      ``RSample`` (Gumbel noise on the top-1 choice); training only.
    drop_tokens: False for dropless (sort by expert and grouped matmul).
    dispatch: the dropless exchange between expert-parallel shards
      (``jaxspeed.moe.dropless``): ``exact`` buffers with room for every assignment,
      or ``padding_free`` (X-MoE) ones of ``dispatch_slack`` x the balanced share,
      falling back to exact when any device's rows overflow them.
    dispatch_slack: the padding-free buffer over the balanced share, >= 1.
    dedup_dispatch: X-MoE's redundancy-bypassing dispatch: a token goes once to each
      shard holding some of its experts and is fanned out there (dropless only).
    use_rts: random token selection (top-1, training).
    top2_2nd_expert_sampling: Gumbel noise on top-2's second choice (training).
    drop_policy: top-k (k > 2) drops by ``probs`` or ``position``.
    use_residual: Residual-MoE, a dense MLP beside the experts.
    residual_mix: ``sum`` (the paper: MLP(x) + MoE(x)) or ``learned``
      (DeepSpeed: softmax(Linear(d, 2)(x)) mixes the two per token).
    aux_loss_coef: weight of the load-balancing loss (DeepSpeed's tutorial;
      Megatron's ``--moe-loss-coeff`` default is 0.1); used with
      ``balancing = "aux_loss"``.
    balancing: how expert loads are balanced: ``aux_loss`` (DeepSpeed's, weighted by
      ``aux_loss_coef``), ``bias`` (auxiliary-loss-free, DeepSeek-V3: a per-expert
      routing bias moved after every step, ``jaxspeed.moe.balancing``; no aux loss)
      or ``none``.
    bias_update_rate: u of the bias rule b ← b + u · sign(mean load − load).
    expert_d_ff: the hidden width of each expert; 0 for ``model.d_ff``. Fine-grained
      experts (DeepSeek-MoE, Dai et al. 2024; what X-MoE trains) split each expert m
      ways: m times the experts and ``top_k`` at d_ff / m, the same compute per token.
    num_shared_experts: experts every token passes through, ungated, beside the routed
      ones (DeepSeek-MoE's shared experts), each ``expert_d_ff`` wide. Their sum is one
      dense MLP of the summed width, which is how they run.
  """

  KEY = "moe"

  num_experts: int = setting(1, ge=1)
  layer_num_experts: tuple[int, ...] = setting(())
  expert_interval: int = setting(2, ge=1)
  top_k: int = setting(1, ge=1)
  capacity_factor: float = setting(1.0, gt=0)
  eval_capacity_factor: float = setting(1.0, gt=0)
  min_capacity: int = setting(4, ge=0)
  noisy_gate_policy: str = setting("none", choices=NOISY_GATE_POLICIES)
  drop_tokens: bool = setting(True)
  dispatch: str = setting("exact", choices=DISPATCHES)
  dispatch_slack: float = setting(2.0, ge=1)
  dedup_dispatch: bool = setting(False)
  use_rts: bool = setting(True)
  top2_2nd_expert_sampling: bool = setting(True)
  drop_policy: str = setting("probs", choices=DROP_POLICIES)
  use_residual: bool = setting(False)
  residual_mix: str = setting("sum", choices=RESIDUAL_MIXES)
  aux_loss_coef: float = setting(0.01, ge=0)
  balancing: str = setting("aux_loss", choices=BALANCING)
  bias_update_rate: float = setting(1e-3, gt=0)
  expert_d_ff: int = setting(0, ge=0)
  num_shared_experts: int = setting(0, ge=0)

  def check(self) -> None:
    if self.drop_tokens and self.dispatch != "exact":
      raise ConfigError("moe.dispatch", f"{self.dispatch!r} is a dropless exchange; set "
                        "moe.drop_tokens=False or moe.dispatch='exact'")
    if self.drop_tokens and self.dedup_dispatch:
      raise ConfigError("moe.dedup_dispatch", "deduplicated dispatch is a dropless exchange; "
                        "set moe.drop_tokens=False or moe.dedup_dispatch=False")
    counts = self.layer_num_experts
    if any(not isinstance(e, int) or isinstance(e, bool) or e < 1 for e in counts):
      raise ConfigError("moe.layer_num_experts",
                        f"expert counts must be ints >= 1, got {list(counts)}")

  @classmethod
  def from_config(cls, moe: Mapping[str, Any]) -> MoeConfig:
    """Reads and checks ``config.moe``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(moe).items() if k in fields}
    values["layer_num_experts"] = tuple(values.get("layer_num_experts", ()))
    return cls(**values)

  @property
  def padding_free_slack(self) -> float | None:
    """The padding-free buffer's slack, or None for exact buffers."""
    return self.dispatch_slack if self.dispatch == "padding_free" else None

  @property
  def loss_coef(self) -> float:
    """The aux loss's weight in the objective: ``aux_loss_coef`` if balancing by it, else 0."""
    return self.aux_loss_coef if self.balancing == "aux_loss" else 0.0

  @property
  def bias_rate(self) -> float:
    """The routing bias's step u if balancing by bias (and experts exist), else 0."""
    return self.bias_update_rate if self.enabled and self.balancing == "bias" else 0.0

  @property
  def enabled(self) -> bool:
    return self.num_experts > 1 or any(e > 1 for e in self.layer_num_experts)

  def is_moe_layer(self, layer: int) -> bool:
    return self.enabled and (layer + 1) % self.expert_interval == 0

  def num_moe_layers(self, num_layers: int) -> int:
    return sum(self.is_moe_layer(i) for i in range(num_layers))

  def experts_at(self, layer: int) -> int:
    """Experts of layer ``layer`` (0-based); 0 if it is a dense layer."""
    if not self.is_moe_layer(layer):
      return 0
    if not self.layer_num_experts:
      return self.num_experts
    return self.layer_num_experts[(layer + 1) // self.expert_interval - 1]

  def feed_forward_at(self, layer: int) -> MoeFeedForward | None:
    """The feed-forward ``Block`` of layer ``layer`` builds: its experts, or None (dense MLP)."""
    experts = self.experts_at(layer)
    return MoeFeedForward(experts) if experts else None
