"""The MoE feed-forward layer (DeepSpeed-MoE, Rajbhandari et al. 2022), a drop-in for ``Mlp``.

Gating groups are sequences: each row of the [B, S] batch is routed on its
own, with capacity C = ⌈S/E · cf · k⌉. DeepSpeed routes all tokens of a rank
together, so which tokens it drops depends on the per-rank batch; per-row
groups (GShard's groups) make the result independent of how the batch is
split, which is what lets expert-parallel runs equal the single-device one.

Noise (Jitter, RSample, top-2 sampling, RTS) is drawn from the ``moe`` rng
over the whole [B, S, ·] batch before any split, for the same reason. The
``moe`` rng is present exactly in training steps; without it the layer runs
in evaluation mode: ``eval_capacity_factor``, no noise, first-come drops.

Statistics leave through the ``moe`` collection (``sow``): ``aux_loss`` (the
layer's load-balancing loss, a mean over groups), ``expert_counts`` ([E]
routed tokens), ``dropped`` (token-expert assignments over capacity),
``dispatch_fallback`` (dropless: 1 if the padding-free buffers overflowed). With
``moe.balancing = "bias"`` the layer holds the routing bias of
``jaxspeed.moe.balancing`` as its parameter ``routing_bias`` [E].
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.models.config import ModelConfig
from jaxspeed.models.layers import Mlp, constrain, dense, param_init, zeros_init
from jaxspeed.moe.balancing import BIAS
from jaxspeed.moe.dropless import dropless_experts
from jaxspeed.moe.expert_parallel import (
  expert_parallel_dropless,
  expert_parallel_experts,
  expert_parallel_size,
)
from jaxspeed.moe.experts import ExpertWeights, capacity_experts
from jaxspeed.moe.gating import capacity, dispatch_and_combine, route
from jaxspeed.parallel.ulysses import sequence_parallel_size

if TYPE_CHECKING:  # jaxspeed.moe.config builds its layers' feed-forward from this module
  from jaxspeed.moe.config import MoeConfig

JITTER_EPS = 0.01  # DeepSpeed's multiplicative_jitter epsilon


class MoeMlp(nn.Module):
  """``num_experts`` expert MLPs behind a top-k gate, optionally beside shared experts and a
  dense MLP.

  ``__call__(x [B, S, d], deterministic) -> [B, S, d]``.
  """

  config: ModelConfig
  moe: MoeConfig
  num_experts: int

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    training = self.has_rng("moe")
    key = self.make_rng("moe") if training else None
    cap = self.capacity(x.shape[1], training) if self.moe.drop_tokens else None
    out = self._experts(x, self._route(x, key, cap), cap)
    out = nn.Dropout(cfg.dropout)(out, deterministic=deterministic)
    if self.moe.num_shared_experts:
      shared = dataclasses.replace(cfg, d_ff=self.moe.num_shared_experts * self.expert_d_ff)
      out = out + Mlp(shared, name="shared_experts")(x, deterministic)
    if self.moe.use_residual:
      out = self._mix(x, out, Mlp(cfg, name="residual_mlp")(x, deterministic))
    return constrain(out, ("batch", "seq", "embed"))

  def _route(self, x: jax.Array, key: jax.Array | None, cap: int | None):
    """Routing of every row: a ``Routing`` of [B, S, k] arrays (vmapped gates)."""
    moe, e = self.moe, self.num_experts
    wg = self.param("gate", param_init(("embed", None)), (x.shape[-1], e))
    h = x.astype(jnp.float32)  # the gate runs in fp32 whatever the compute dtype
    keys = jax.random.split(key, 3) if key is not None else (None,) * 3
    if key is not None and moe.noisy_gate_policy == "Jitter":
      h = h * jax.random.uniform(keys[0], h.shape, minval=1 - JITTER_EPS, maxval=1 + JITTER_EPS)
    logits = dense(h, wg)  # [B, S, E]
    # Auxiliary-loss-free balancing's bias: read here, moved by the train step (no gradient
    # reaches it: it only changes which experts are chosen).
    bias = (self.param(BIAS, zeros_init((None,)), (e,)) if moe.balancing == "bias" else None)
    gumbel = None
    if key is not None and ((moe.top_k == 1 and moe.noisy_gate_policy == "RSample")
                            or (moe.top_k == 2 and moe.top2_2nd_expert_sampling)):
      gumbel = jax.random.gumbel(keys[1], logits.shape)
    rts = None
    if key is not None and moe.top_k == 1 and moe.use_rts and moe.drop_tokens:
      rts = jax.random.uniform(keys[2], logits.shape)
    routing = jax.vmap(lambda z, r, g: route(z, moe.top_k, cap, rts_noise=r, selection_noise=g,
                                             drop_policy=moe.drop_policy, bias=bias),
                       in_axes=(0, None if rts is None else 0, None if gumbel is None else 0))(
        logits, rts, gumbel)
    self.sow("moe", "aux_loss", jnp.mean(routing.aux_loss))
    self.sow("moe", "expert_counts", jnp.sum(routing.counts, axis=0))
    self.sow("moe", "dropped", jnp.sum(~routing.kept).astype(jnp.int32))
    return routing

  def capacity(self, seq_len: int, training: bool) -> int:
    """C of one sequence-group of ``seq_len`` tokens."""
    moe = self.moe
    cf = moe.capacity_factor if training else moe.eval_capacity_factor
    return capacity(seq_len, self.num_experts, cf, moe.min_capacity, moe.top_k)

  @property
  def expert_d_ff(self) -> int:
    """Each expert's hidden width: ``moe.expert_d_ff``, or the model's d_ff."""
    return self.moe.expert_d_ff or self.config.d_ff

  def _weights(self, d: int) -> ExpertWeights:
    e, f = self.num_experts, self.expert_d_ff
    return ExpertWeights(
        self.param("wi", param_init(("experts", "embed", "mlp")), (e, d, f)),
        self.param("wi_bias", zeros_init(("experts", "mlp")), (e, f)),
        self.param("wo", param_init(("experts", "mlp", "embed")), (e, f, d)),
        self.param("wo_bias", zeros_init(("experts", "embed")), (e, d)),
    ).cast(self.config.compute_dtype)

  def _experts(self, x: jax.Array, routing, cap: int | None) -> jax.Array:
    """[B, S, d] through the routed experts: dropless, on this device, or expert-parallel."""
    w = self._weights(x.shape[-1])
    b, s, d = x.shape
    dropless = dict(dedup=self.moe.dedup_dispatch, slack=self.moe.padding_free_slack)
    if cap is None:
      if expert_parallel_size() > 1 or sequence_parallel_size() > 1:
        y, fell_back = expert_parallel_dropless(x, routing.experts, routing.weights, w,
                                                **dropless)
      else:
        y, fell_back = dropless_experts(x.reshape(b * s, d), routing.experts.reshape(b * s, -1),
                                        routing.weights.reshape(b * s, -1), w, **dropless)
      self.sow("moe", "dispatch_fallback", fell_back.astype(jnp.int32))
      return y.reshape(b, s, d)
    dispatch, combine = jax.vmap(lambda r: dispatch_and_combine(r, self.num_experts, cap))(
        routing)
    if expert_parallel_size() > 1:
      return expert_parallel_experts(x, dispatch, combine, w)
    return capacity_experts(x, dispatch, combine, w)

  def _mix(self, x: jax.Array, moe_out: jax.Array, mlp_out: jax.Array) -> jax.Array:
    """Residual-MoE: MLP(x) + MoE(x), or DeepSpeed's learned per-token softmax mix."""
    if self.moe.residual_mix == "sum":
      return moe_out + mlp_out
    w = self.param("residual_coef", param_init(("embed", None)), (x.shape[-1], 2))
    b = self.param("residual_coef_bias", zeros_init((None,)), (2,))
    c = jax.nn.softmax(dense(x.astype(jnp.float32), w) + b, axis=-1).astype(x.dtype)
    return moe_out * c[..., :1] + mlp_out * c[..., 1:]


@dataclasses.dataclass(frozen=True)
class MoeFeedForward:
  """An MoE layer's feed-forward for ``Block(feed_forward=...)``: ``MoeMlp`` named ``moe``."""

  num_experts: int

  def __call__(self, config: ModelConfig) -> MoeMlp:
    return MoeMlp(config, config.moe, self.num_experts, name="moe")
