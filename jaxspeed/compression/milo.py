"""MiLo: INT3 MoE experts with low-rank compensators (Huang et al. 2025, arXiv:2504.02658).

Each expert weight W [K, N] becomes

  W ≈ deq(Q) + U·V,   deq(Q)[k, n] = Q[k, n]·s[g, n] + m[g, n],  g = k // group_size

with Q b-bit asymmetric codes per (K-group, column), packed as bit planes
(``pallas_kernels.milo_matmul``), and U [K, r], V [r, N] a rank-r compensator
of the quantization residual E = W - deq(Q). MiLo's loop (its
``MiLoLinear.compress``): U = V = 0; repeat Q = quant(W - U·V), E = W - deq(Q),
U·V = the rank-r truncated SVD of E (U = U_s·√S, V = √S·V_sᵀ).

Ranks differ per expert and layer. MiLo gives experts a rank proportional to
their routing frequency (DeepSeek-MoE) or a power of two of the weight's
kurtosis (Mixtral); both rules are here (``frequency_ranks``,
``kurtosis_ranks``). ``allocate_ranks`` combines the two kinds of statistics
under an exact byte budget: a rank of expert e removes σ² of its residual's
spectrum from the error of every token routed to it, so it picks rank units by
f_e·g·σ² per byte, g the gain from the matrix to the expert's output
(``output_gains``); ``choose_ranks`` applies any of the rules to a model's
layers. ``calibrate`` then trains only U, V to match the float expert outputs
on calibration tokens (MiLo itself is calibration-free).

Differences from MiLo: the codes use min-max ranges (HQQ's proximal solver
is not reproduced), and U, V are stored in 16-bit floats (MiLo quantizes them to
INT3 as well).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxspeed.compression.quantizers import TINY, asymmetric_codes
from jaxspeed.errors import ConfigError
from jaxspeed.moe.experts import ExpertWeights
from jaxspeed.schema import Section, setting
from pallas_kernels import milo_matmul as kernels
from pallas_kernels.milo_matmul import ROWS_PER_WORD, pack_bitplanes, unpack_bitplanes

BITS = (2, 3, 4)
ALLOCATIONS = ("energy", "frequency", "kurtosis", "uniform")
COMPENSATOR_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class MiloConfig(Section):
  """MiLo post-training compression of the expert weights.

  ``mean_rank`` is the budget: the extra bytes of a rank ``mean_rank``
  compensator on every expert matrix; ``allocation`` shares it out.
  """

  KEY = "milo"

  bits: int = setting(3, choices=BITS)
  group_size: int = setting(64, ge=ROWS_PER_WORD)
  mean_rank: int = setting(8, ge=0)
  allocation: str = setting("energy", choices=ALLOCATIONS)
  kurtosis_offset: int = setting(3, ge=0)  # MiLo's k: 2^(κ + k); 3 for mean rank ~32
  iters: int = setting(1, ge=1)  # MiLo's alternating quantize / SVD rounds (its default 10)
  compensator_dtype: str = setting("float16", choices=COMPENSATOR_DTYPES)
  calib_steps: int = setting(100, ge=0)
  calib_lr: float = setting(1e-3, gt=0)

  def check(self) -> None:
    if self.group_size % ROWS_PER_WORD:
      raise ConfigError("milo.group_size", f"must be a multiple of {ROWS_PER_WORD} (one "
                        f"packed word holds 32 rows), got {self.group_size}")


# ---------------------------------------------------------------------------
# Group-wise low-bit codes.


@flax.struct.dataclass
class GroupQuantized:
  """A [K, N] weight as packed b-bit codes with a float16 scale and minimum per K-group.

  Attributes:
    packed: uint32 [bits, K/32, N] (bit planes, see ``pallas_kernels.milo_matmul``).
    scales, mins: float16 [K / group_size, N].
  """

  packed: jax.Array
  scales: jax.Array
  mins: jax.Array

  @property
  def bits(self) -> int:
    return self.packed.shape[-3]

  @property
  def shape(self) -> tuple[int, int]:
    return self.packed.shape[-2] * ROWS_PER_WORD, self.packed.shape[-1]

  def codes(self) -> jax.Array:
    """int32 [K, N] in [0, 2^bits)."""
    return unpack_bitplanes(self.packed)

  def dequantize(self) -> jax.Array:
    """float32 [K, N] = codes · scale + min."""
    return kernels.dequantize(self.packed, self.scales.astype(jnp.float32),
                              self.mins.astype(jnp.float32))


def check_bits(bits: int, group_size: int, k: int) -> None:
  """ConfigError (``milo.bits`` / ``milo.group_size``) unless the codes fit a K-row weight."""
  MiloConfig(bits=bits, group_size=group_size)
  if k % group_size:
    raise ConfigError("milo.group_size", f"must divide the weight's K={k}, got {group_size}")


def quantize_groupwise(w: jax.Array, bits: int, group_size: int) -> GroupQuantized:
  """Asymmetric min-max b-bit codes of w [K, N], one range per (K-group, column).

  s = (max - min) / (2^b - 1), so both ends of the range are codes. DeepSpeed's
  asymmetric quantizer divides by 2^b, which at 3 bits clips the top eighth of
  every group's range.
  """
  check_bits(bits, group_size, w.shape[0])
  k, n = w.shape
  groups = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
  lo, hi = jnp.min(groups, axis=1), jnp.max(groups, axis=1)
  scales = jnp.maximum((hi - lo) / (2**bits - 1), TINY).astype(jnp.float16)
  mins = lo.astype(jnp.float16)
  # Codes from the float16 range that is stored, so deq uses what the codes assumed.
  codes = asymmetric_codes(groups, scales.astype(jnp.float32)[:, None],
                           mins.astype(jnp.float32)[:, None], bits)
  return GroupQuantized(pack_bitplanes(codes.reshape(k, n), bits), scales, mins)


# ---------------------------------------------------------------------------
# One compressed weight: codes plus compensator.


@flax.struct.dataclass
class MiloWeight:
  """W ≈ deq(q) + u·v. Stacked over experts, every array gets a leading [E] axis.

  Attributes:
    q: the group-wise codes.
    u: [K, R], v: [R, N], R ≥ rank; columns of u (rows of v) past ``rank`` are 0.
    rank: int32 [] the compensator's rank (the bytes it costs).
  """

  q: GroupQuantized
  u: jax.Array
  v: jax.Array
  rank: jax.Array

  def dequantize(self) -> jax.Array:
    """float32 [K, N] (vmap over a stacked weight)."""
    return self.q.dequantize() + self.u.astype(jnp.float32) @ self.v.astype(jnp.float32)

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes, scales, mins, and each compensator's own ``rank`` columns.

    The arrays pad ranks to the largest for vmapping; a deployment stores each
    expert's compensator at its own rank, which is what this counts.
    """
    k, n = self.q.shape
    codes = sum(x.nbytes for x in (self.q.packed, self.q.scales, self.q.mins))
    return codes + int(np.sum(np.asarray(self.rank))) * (k + n) * self.u.dtype.itemsize


def svd_compensator(residual: jax.Array, rank: jax.Array, max_rank: int
                    ) -> tuple[jax.Array, jax.Array]:
  """U [K, R], V [R, N] with U·V the rank-``rank`` truncated SVD of residual [K, N].

  R = ``max_rank`` (static); singular directions past ``rank`` (traced) are 0.
  U = U_s·√S and V = √S·V_sᵀ split the singular values evenly (MiLo's choice).
  An exact SVD: deterministic, and cheap at expert sizes.
  """
  u_s, s, vt = jnp.linalg.svd(residual.astype(jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:max_rank]) * (jnp.arange(max_rank) < rank)
  return u_s[:, :max_rank] * root, root[:, None] * vt[:max_rank]


def residual_spectrum(w: jax.Array, bits: int, group_size: int) -> jax.Array:
  """σ² [min(K, N)] of E = W - deq(Q(W)), descending: what each rank could remove."""
  e = w.astype(jnp.float32) - quantize_groupwise(w, bits, group_size).dequantize()
  return jnp.square(jnp.linalg.svd(e, compute_uv=False))


def compress(w: jax.Array, rank: jax.Array, max_rank: int, config: MiloConfig) -> MiloWeight:
  """MiLo's alternating loop on w [K, N] (``config.iters`` rounds); vmap over experts.

  Args:
    w: float [K, N].
    rank: int [] this weight's rank, ≤ max_rank (traced, so experts may differ).
    max_rank: static width of the stored U, V.
    config: bits, group size, rounds, compensator dtype.
  """
  w = w.astype(jnp.float32)
  u = jnp.zeros((w.shape[0], max_rank), jnp.float32)
  v = jnp.zeros((max_rank, w.shape[1]), jnp.float32)
  q = None
  for _ in range(config.iters):
    q = quantize_groupwise(w - u @ v, config.bits, config.group_size)
    u, v = svd_compensator(w - q.dequantize(), rank, max_rank)
  dtype = jnp.dtype(config.compensator_dtype)
  return MiloWeight(q, u.astype(dtype), v.astype(dtype), jnp.asarray(rank, jnp.int32))


def milo_matmul(x: jax.Array, w: MiloWeight) -> jax.Array:
  """x [..., K] @ (deq(q) + u·v) -> float32 [..., N], the codes unpacked on the fly.

  The Pallas kernel on GPU (``use_pallas``), the XLA reference elsewhere.
  """
  lead = x.shape[:-1]
  x = x.reshape(-1, x.shape[-1])
  args = (x, w.q.packed, w.q.scales, w.q.mins, w.u, w.v) if w.u.shape[-1] else (
      x, w.q.packed, w.q.scales, w.q.mins)
  fn = kernels.milo_matmul if kernels.use_pallas() else kernels.milo_matmul_reference
  return fn(*args).reshape(*lead, w.q.shape[1])


# ---------------------------------------------------------------------------
# Ranks.


def check_ranks(ranks, max_rank: int, key: str = "milo.ranks") -> np.ndarray:
  """The ranks as an int array; ConfigError(key) if one is < 0 or > max_rank."""
  ranks = np.asarray(ranks)
  if ranks.size and (ranks.min() < 0 or ranks.max() > max_rank):
    bad = int(ranks.min() if ranks.min() < 0 else ranks.max())
    raise ConfigError(key, f"ranks must be in [0, {max_rank}] (min(K, N)), got {bad}")
  return ranks.astype(np.int64)


def frequency_ranks(frequencies, mean_rank: int, max_rank: int) -> np.ndarray:
  """MiLo's DeepSeek-MoE rule: r_e = round(f_e / Σf · mean_rank · E), capped at max_rank.

  The layer's mean rank is ``mean_rank`` up to rounding and the cap.
  """
  f = np.asarray(frequencies, np.float64)
  share = f / f.sum() if f.sum() > 0 else np.full_like(f, 1 / f.size)
  return np.minimum(np.round(share * mean_rank * f.size), max_rank).astype(np.int64)


def kurtosis(w: jax.Array) -> float:
  """Excess (Fisher) kurtosis of the entries of w: E[(x - μ)^4] / σ^4 - 3."""
  x = np.asarray(w, np.float64).ravel()
  x = x - x.mean()
  return float(np.mean(x**4) / max(np.mean(x**2) ** 2, 1e-300) - 3)


def kurtosis_ranks(kurtoses, offset: int, max_rank: int) -> np.ndarray:
  """MiLo's Mixtral rule on κ rounded: 0 if κ < 1, 1024 if κ > 9, else 2^(κ + offset);
  capped at max_rank."""
  k = np.round(np.asarray(kurtoses, np.float64))
  ranks = np.where(k < 1, 0, np.where(k > 9, 1024, 2.0 ** (k + offset)))
  return np.minimum(ranks, max_rank).astype(np.int64)


def allocate_ranks(weights, spectra, costs, budget: float) -> np.ndarray:
  """Ranks of n matrices maximizing Σ w_i · (σ² removed) with Σ rank_i · cost_i ≤ budget.

  Rank unit j of matrix i removes σ²_ij of its residual from every token
  routed to it, so it gains w_i · σ²_ij with w_i the expert's routing
  frequency (times the mean square of the matrix's inputs, when known: the
  output error of an isotropic input of power p is p · ‖E‖²_F); units are
  taken greedily by gain per byte. σ² is descending in j, so each matrix's
  units come in order and the greedy choice is optimal when the matrices cost
  the same per rank.

  Args:
    weights: [n] how much each matrix's error counts (see above).
    spectra: [n, R] σ² of each residual, descending.
    costs: [n] bytes of one rank unit (K + N compensator entries).
    budget: bytes for all compensators.

  Returns:
    int [n] ranks.
  """
  f, s = np.asarray(weights, np.float64), np.asarray(spectra, np.float64)
  costs = np.asarray(costs, np.float64)
  if np.any(s[:, 1:] > s[:, :-1] * (1 + 1e-6) + 1e-30):
    raise ValueError("each spectrum must be in descending order")
  gain = f[:, None] * s / costs[:, None]
  order = np.lexsort((np.arange(s.shape[1])[None].repeat(len(f), 0).ravel(), -gain.ravel()))
  ranks, left = np.zeros(len(f), np.int64), float(budget)
  for flat in order:
    i = flat // s.shape[1]
    if gain.ravel()[flat] <= 0 or costs[i] > left or flat % s.shape[1] != ranks[i]:
      continue
    ranks[i] += 1
    left -= costs[i]
  return ranks


# ---------------------------------------------------------------------------
# Experts.


@flax.struct.dataclass
class MiloExperts:
  """An MoE layer's experts compressed: ``wi``, ``wo`` stacked MiloWeights over E."""

  wi: MiloWeight
  wo: MiloWeight
  wi_bias: jax.Array
  wo_bias: jax.Array

  def dequantize(self) -> ExpertWeights:
    """Float ExpertWeights deq(Q) + U·V, for the model's expert path."""
    deq = jax.vmap(MiloWeight.dequantize)
    return ExpertWeights(deq(self.wi), self.wi_bias, deq(self.wo), self.wo_bias)

  @property
  def nbytes(self) -> int:
    return self.wi.nbytes + self.wo.nbytes + self.wi_bias.nbytes + self.wo_bias.nbytes


def compress_experts(w: ExpertWeights, ranks_wi, ranks_wo, config: MiloConfig
                     ) -> MiloExperts:
  """Every expert's wi [E, d, f] and wo [E, f, d] through ``compress`` at its own rank.

  Raises:
    ConfigError: ``milo.ranks`` for a rank < 0 or > min(d, f); ``milo.bits`` /
      ``milo.group_size`` for codes that do not fit.
  """
  d, f = w.wi.shape[1:]
  for k in (d, f):
    check_bits(config.bits, config.group_size, k)
  ranks_wi, ranks_wo = check_ranks(ranks_wi, min(d, f)), check_ranks(ranks_wo, min(d, f))
  max_rank = int(max(ranks_wi.max(initial=0), ranks_wo.max(initial=0)))
  run = lambda mats, ranks: _compress_stacked(mats, jnp.asarray(ranks), max_rank, config)
  return MiloExperts(run(w.wi, ranks_wi), run(w.wo, ranks_wo),
                     w.wi_bias.astype(jnp.float32), w.wo_bias.astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _compress_stacked(mats: jax.Array, ranks: jax.Array, max_rank: int,
                      config: MiloConfig) -> MiloWeight:
  """``compress`` over a stack [E, K, N] (compiled once per shape and setting)."""
  return jax.vmap(lambda m, r: compress(m, r, max_rank, config))(mats, ranks)


def expert_mlp(x: jax.Array, w: ExpertWeights) -> jax.Array:
  """One expert's MLP on x [T, d] (the formula of ``jaxspeed.moe.experts``): [T, d]."""
  return jax.nn.gelu(x @ w.wi + w.wi_bias) @ w.wo + w.wo_bias


class LayerStats(NamedTuple):
  """Calibration statistics of one MoE layer.

  Attributes:
    tokens: [E, T, d] inputs routed to each expert (padded); mask: [E, T] 1 for real rows.
    counts: [E] tokens routed to each expert (the routing frequency).
  """

  tokens: jax.Array | np.ndarray
  mask: jax.Array | np.ndarray
  counts: np.ndarray


def output_gains(w: ExpertWeights, tokens, mask) -> np.ndarray:
  """[E, 2]: expert output error per unit of σ² removed from wi's and from wo's residual.

  For isotropic inputs of power p, a residual E adds p · ‖E‖²_F to its matmul's
  output error. wo's error is the expert's (p = mean square of GELU(h)); wi's
  passes GELU'(h) and wo first, scaling it by E[GELU'(h)²] · ‖wo‖²_F / d_ff.
  """
  mask = np.asarray(mask)
  h = jnp.einsum("etd,edf->etf", tokens, w.wi) + w.wi_bias[:, None]
  count = np.maximum(mask.sum(1), 1)
  mean = lambda a: np.einsum("et,et->e", np.asarray(jnp.mean(a, axis=-1)), mask) / count
  slope = jax.vmap(jax.vmap(jax.vmap(jax.grad(jax.nn.gelu))))(h)
  wo_gain = np.asarray(jnp.sum(jnp.square(w.wo), axis=(1, 2))) / w.wo.shape[1]
  p_in = mean(jnp.square(tokens))
  return np.stack([p_in * mean(jnp.square(slope)) * wo_gain,
                   mean(jnp.square(jax.nn.gelu(h)))], axis=1)


def choose_ranks(config: MiloConfig, experts: Mapping[str, ExpertWeights],
                 stats: Mapping[str, LayerStats]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Layer -> (ranks of wi [E], ranks of wo [E]) by ``config.allocation``.

  The budget is ``config.mean_rank`` on every matrix. ``uniform`` spends it so;
  ``frequency`` shares each layer's by routing frequency (MiLo, DeepSeek-MoE);
  ``kurtosis`` ignores it (MiLo's Mixtral rule); ``energy`` spends the whole
  budget over all matrices of all layers with ``allocate_ranks``, weighting
  each matrix by its expert's routed tokens times its ``output_gains``.
  """
  layers = list(experts)
  d, f = experts[layers[0]].wi.shape[1:]
  max_rank, cost = min(d, f), (d + f) * jnp.dtype(config.compensator_dtype).itemsize
  num = experts[layers[0]].wi.shape[0]
  if config.allocation == "uniform":
    r = np.full(num, min(config.mean_rank, max_rank))
    return {layer: (r, r) for layer in layers}
  if config.allocation == "frequency":
    return {layer: (frequency_ranks(stats[layer].counts, config.mean_rank, max_rank),) * 2
            for layer in layers}
  if config.allocation == "kurtosis":
    return {layer: tuple(kurtosis_ranks([kurtosis(m) for m in mats], config.kurtosis_offset,
                                        max_rank)
                         for mats in (experts[layer].wi, experts[layer].wo))
            for layer in layers}
  weights, spectra = [], []
  spectrum = jax.jit(jax.vmap(lambda m: residual_spectrum(m, config.bits, config.group_size)))
  for layer in layers:
    gains = output_gains(experts[layer], stats[layer].tokens, stats[layer].mask)
    for j, mats in enumerate((experts[layer].wi, experts[layer].wo)):
      spectra.append(np.asarray(spectrum(mats)))
      weights.append(np.asarray(stats[layer].counts) * gains[:, j])
  weights, spectra = np.concatenate(weights), np.concatenate(spectra)
  ranks = allocate_ranks(weights, spectra, np.full(len(weights), cost),
                         config.mean_rank * len(weights) * cost)
  ranks = ranks.reshape(len(layers), 2, num)
  return {layer: (ranks[i, 0], ranks[i, 1]) for i, layer in enumerate(layers)}


def calibrate(experts: MiloExperts, float_experts: ExpertWeights, tokens: jax.Array,
              mask: jax.Array, *, steps: int, learning_rate: float
              ) -> tuple[MiloExperts, list[float]]:
  """Trains only U, V so each compressed expert matches its float expert on its tokens.

  Loss per expert: mean over its tokens of ‖y_quant - y_float‖² / d; summed over
  experts, which are independent. Rank-padding columns start at 0 with zero
  gradient (U and V are both 0 there), so they stay 0 and ranks are kept.

  Args:
    experts: the compressed layer (initial U, V from the SVD).
    float_experts: its float weights (the targets).
    tokens: [E, T, d] inputs routed to each expert; mask: [E, T] 1 for real rows.
    steps, learning_rate: Adam's.

  Returns:
    (the calibrated experts, the loss at each step).
  """
  if steps == 0:
    return experts, []
  fw = float_experts.cast(jnp.float32)
  data = (jax.vmap(GroupQuantized.dequantize)(experts.wi.q),
          jax.vmap(GroupQuantized.dequantize)(experts.wo.q), fw.wi_bias, fw.wo_bias,
          tokens, mask, jax.vmap(expert_mlp)(tokens, fw))
  lowrank = tuple(a.astype(jnp.float32)
                  for a in (experts.wi.u, experts.wi.v, experts.wo.u, experts.wo.v))
  state, losses = optax.adam(learning_rate).init(lowrank), []
  for _ in range(steps):
    lowrank, state, loss = _calibration_step(lowrank, state, data, learning_rate)
    losses.append(float(loss))
  dtype = experts.wi.u.dtype
  ui, vi, uo, vo = (a.astype(dtype) for a in lowrank)
  return (experts.replace(wi=experts.wi.replace(u=ui, v=vi),
                          wo=experts.wo.replace(u=uo, v=vo)), losses)


def _calibration_loss(lowrank, data) -> jax.Array:
  ui, vi, uo, vo = lowrank
  base_i, base_o, bias_i, bias_o, tokens, mask, target = data
  w = ExpertWeights(base_i + ui @ vi, bias_i, base_o + uo @ vo, bias_o)
  err = jnp.mean(jnp.square(jax.vmap(expert_mlp)(tokens, w) - target), axis=-1)
  return jnp.sum(jnp.sum(err * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1))


@functools.partial(jax.jit, static_argnames=("learning_rate",))
def _calibration_step(lowrank, state, data, learning_rate: float):
  """One Adam step on U, V (compiled once per shape and learning rate)."""
  loss, grads = jax.value_and_grad(_calibration_loss)(lowrank, data)
  updates, state = optax.adam(learning_rate).update(grads, state, lowrank)
  return optax.apply_updates(lowrank, updates), state, loss
