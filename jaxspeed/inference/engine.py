"""Batched autoregressive generation over a preallocated KV cache (DeepSpeed Inference).

Two compiled programs do all the work: ``prefill`` runs the right-padded
prompts [B, P] through the model once, filling each layer's cache, and
``decode`` feeds one token per row. Shapes are static, so decoding never
recompiles; prompts are padded to a power-of-two bucket so that prefill
compiles once per bucket. With a mesh whose ``tensor`` axis is > 1, the
parameters and the cache's heads are split by the same logical rules as in
training (Megatron tensor parallelism, Aminabadi et al. 2022).

A KV-compression policy (``jaxspeed.inference.kv_policies``) replaces the
dense cache after prefill by its compressed form; decoding is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxspeed.errors import ConfigError
from jaxspeed.inference.kv_cache import KVCache, cache_bytes
from jaxspeed.inference.sampling import SamplingConfig, sample_logits
from jaxspeed.models.gpt import GPT
from jaxspeed.parallel.rules import compute_rules, logical_to_spec

# By default generation replicates the batch: rows are few, and heads/MLP/vocab carry the split.
RULES = compute_rules(batch_axes=None)
MIN_PROMPT_BUCKET = 16
GREEDY = SamplingConfig()

TokenCallback = Callable[[int, np.ndarray, np.ndarray], None]


def prompt_bucket(length: int, cache_len: int) -> int:
  """The padded prompt length: the next power of two >= length (>= 16), at most cache_len."""
  return min(max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length()), cache_len)


class Generator:
  """Generates from a trained ``GPT``; usable from a notebook or ``experiments.generate``.

  Example::

    gen = Generator(GPT(model_config), params, cache_len=256)
    ids = gen.generate([[72, 105], [84]], max_new_tokens=20)

  Args:
    model: the decoder.
    params: its parameters (unboxed; any sharding, they are re-placed).
    cache_len: cache slots per row = the longest prompt + generation (at most
      ``model.config.max_seq_len`` with learned positions).
    mesh: a mesh to run on; its ``tensor`` axis splits heads, MLP and vocabulary.
    policy: a KV-compression policy, or None for the full cache.
    batch_axes: mesh axes to split the rows over (each data replica decodes
      its own rows, as in RLHF's hybrid engine); None replicates them. The
      number of prompts must then be a multiple of those axes' size.
  """

  def __init__(self, model: GPT, params, *, cache_len: int | None = None,
               mesh: Mesh | None = None, policy=None,
               batch_axes: tuple[str, ...] | None = None):
    cfg = model.config
    self.rules = RULES if batch_axes is None else compute_rules(batch_axes=batch_axes)
    self.model, self.policy, self.mesh = model, policy, mesh
    self.cache_len = cache_len or cfg.max_seq_len
    if cfg.position == "learned" and self.cache_len > cfg.max_seq_len:
      raise ConfigError("inference.max_out_tokens", f"cache_len={self.cache_len} exceeds the "
                        f"learned position table (model.max_seq_len={cfg.max_seq_len})")
    self._param_shardings = self._place = None
    if mesh is not None:
      boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
      specs = jax.tree.map(lambda s: logical_to_spec(tuple(s), RULES),
                           nn.get_partition_spec(boxed["params"]),
                           is_leaf=lambda x: isinstance(x, P))
      self._param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                           is_leaf=lambda x: isinstance(x, P))
      # One program moves the whole tree, so every process runs its collectives in the same
      # order. Across processes ``jax.device_put`` runs one program per leaf instead; those
      # are independent, so XLA:CPU may run them concurrently, and their gloo collectives
      # can then meet in different orders on different processes and wait forever.
      self._place = jax.jit(lambda p: p, out_shardings=self._param_shardings)
    self.load_params(params)
    self._prefill = jax.jit(self._prefill_fn)
    self._decode = jax.jit(self._decode_fn, static_argnames="sampling", donate_argnums=1)
    self._teacher_forced = jax.jit(self._teacher_forced_fn, static_argnums=2)
    # Compiled too: eager ops on sharded logits would each be a program of their own, and
    # independent ones may run concurrently (see ``_place``).
    self._sample = jax.jit(sample_logits, static_argnames="sampling")

  @property
  def param_shardings(self):
    """Where generation keeps each parameter (tensor-parallel only), or None without a mesh."""
    return self._param_shardings

  @property
  def placement(self):
    """The jitted identity that moves parameters into ``param_shardings``, or None without a mesh.

    Its compiled HLO holds the collectives of the switch (see ``rlhf.HybridEngine``).
    """
    return self._place

  def load_params(self, params) -> None:
    """Generates from ``params`` from now on; same shapes, so nothing recompiles.

    On a mesh the parameters are placed in ``param_shardings`` by one compiled program
    (``placement``), device to device.
    """
    if self._place is not None:
      params = self._place(params)
    self.params = params

  # -- compiled steps --------------------------------------------------------------------------

  def _run(self, params, tokens, positions, caches):
    with nn.logical_axis_rules(self.rules):
      return self.model.apply({"params": params}, tokens, positions, cache=caches)

  def _empty_caches(self, batch: int, length: int, track_scores: bool) -> tuple[KVCache, ...]:
    cfg = self.model.config
    cache = KVCache.zeros(batch, length, cfg.num_heads, cfg.kv_heads, cfg.head_dim,
                          cfg.compute_dtype, track_scores)
    names = ("batch", "seq", "kv_heads", "kv")
    with nn.logical_axis_rules(self.rules):
      cache = cache.replace(k=_constrain(cache.k, names), v=_constrain(cache.v, names))
    return (cache,) * cfg.num_layers

  def _prefill_fn(self, params, tokens: jax.Array, lengths: jax.Array):
    """tokens [B, P] right-padded, lengths [B] -> (caches, logits [B, V] at each last token)."""
    batch, prompt_len = tokens.shape
    compress = self.policy is not None
    # The full cache is only needed up to the prompt when a policy compresses it afterwards.
    length = prompt_len if compress else self.cache_len
    caches = self._empty_caches(batch, length, track_scores=compress)
    positions = jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape)
    logits, caches = self._run(params, tokens, positions, caches)
    if compress:
      caches = tuple(self.policy.compress(c, tokens, lengths) for c in caches)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return caches, last

  def _decode_fn(self, params, caches, tokens: jax.Array, positions: jax.Array,
                 rng: jax.Array, sampling: SamplingConfig):
    """One token per row: tokens, positions [B] -> (caches, next tokens [B], logits [B, V])."""
    if self.policy is not None:
      caches = tuple(self.policy.before_decode(c, tokens) for c in caches)
    logits, caches = self._run(params, tokens[:, None], positions[:, None], caches)
    logits = logits[:, 0]
    return caches, sample_logits(logits, rng, sampling), logits

  def _teacher_forced_fn(self, params, tokens: jax.Array, prompt_len: int):
    caches, first = self._prefill_fn(params, tokens[:, :prompt_len],
                                     jnp.full(tokens.shape[:1], prompt_len))

    def step(caches, t):
      tok = jax.lax.dynamic_index_in_dim(tokens, t, axis=1, keepdims=False)
      caches, _, logits = self._decode_fn(params, caches, tok, jnp.full_like(tok, t), None,
                                          SamplingConfig())
      return caches, logits

    _, rest = jax.lax.scan(step, caches, jnp.arange(prompt_len, tokens.shape[1] - 1))
    return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)

  # -- public API ------------------------------------------------------------------------------

  def check_prompts(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
    """Returns the prompt lengths [B]; raises ``ConfigError`` on empty or too long prompts."""
    if not prompts:
      raise ConfigError("prompts", "no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
      raise ConfigError("prompts", f"prompt {int(np.argmin(lengths))} is empty; every prompt "
                        "needs at least one token")
    if lengths.max() >= self.cache_len:
      raise ConfigError("prompts", f"a prompt of {lengths.max()} tokens leaves no room in the "
                        f"KV cache of {self.cache_len} slots (cache_len)")
    return lengths

  def prefill(self, prompts: Sequence[Sequence[int]]):
    """Runs the prompts; returns (caches, last-token logits [B, V], lengths [B])."""
    lengths = self.check_prompts(prompts)
    tokens = np.zeros((len(prompts), prompt_bucket(int(lengths.max()), self.cache_len)), np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, : len(prompt)] = prompt
    with self._mesh_context():
      caches, logits = self._prefill(self.params, jnp.asarray(tokens), jnp.asarray(lengths))
    return caches, logits, lengths

  def cache_bytes(self, batch: int, prompt_len: int) -> int:
    """Bytes of the arrays the decode program carries for ``batch`` prompts of ``prompt_len``.

    Read from the shapes ``prefill`` returns (nothing runs); constant while decoding.
    """
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    with self._mesh_context():
      caches, _ = jax.eval_shape(self._prefill_fn, self.params, tokens, lengths)
    return cache_bytes(caches)

  def decode_step(self, caches, tokens: jax.Array, positions: jax.Array, rng: jax.Array,
                  sampling: SamplingConfig = GREEDY):
    """Feeds tokens [B] at positions [B]; returns (caches, next tokens [B], logits [B, V]).

    The caches passed in are donated (their buffers are reused).
    """
    with self._mesh_context():
      return self._decode(self.params, caches, tokens, positions, rng, sampling=sampling)

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               sampling: SamplingConfig = GREEDY, seed: int = 0,
               stop_tokens: Sequence[int] = (), on_token: TokenCallback | None = None
               ) -> list[list[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Args:
      prompts: B lists of token ids, of any lengths (1 .. cache_len - 1).
      sampling: greedy by default; temperature / top-k / top-p otherwise.
      seed: the sampling seed (same seed, same tokens).
      stop_tokens: a row ends after emitting one of these (it is included).
      on_token: streaming callback ``on_token(step, tokens [B], active [B])``
        called as soon as each step's tokens are known.

    Returns:
      The generated ids per row (without the prompt). Generation also stops
      when a row's cache is full.
    """
    if max_new_tokens < 1:
      raise ConfigError("inference.max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    caches, logits, lengths = self.prefill(prompts)
    # A generated token needs a cache slot only when it is fed back in.
    steps = min(max_new_tokens, self.cache_len - int(lengths.max()) + 1)
    rng = jax.random.PRNGKey(seed)
    stops = np.asarray(list(stop_tokens), np.int32)
    out = [[] for _ in prompts]
    active = np.ones(len(prompts), bool)
    with self._mesh_context():
      rng, sub = jax.random.split(rng)
      tokens = self._sample(logits, sub, sampling=sampling)
      for step in range(steps):
        host = np.asarray(jax.device_get(tokens))
        for row in np.flatnonzero(active):
          out[row].append(int(host[row]))
        if on_token is not None:
          on_token(step, host, active.copy())
        active &= ~np.isin(host, stops)
        if not active.any() or step == steps - 1:
          break
        rng, sub = jax.random.split(rng)
        caches, tokens, _ = self.decode_step(caches, tokens, jnp.asarray(lengths + step), sub,
                                             sampling)
    return out

  def teacher_forced_logits(self, tokens: np.ndarray, prompt_len: int) -> jax.Array:
    """Prefills ``tokens[:, :prompt_len]``, then feeds the rest one at a time.

    Returns:
      float32 logits [B, N - prompt_len, V]: the predictions of tokens
      ``prompt_len .. N-1``, each made from the (possibly compressed) cache.
    """
    self.check_prompts([row[:prompt_len] for row in tokens])
    if tokens.shape[1] > self.cache_len:
      raise ConfigError("tokens", f"{tokens.shape[1]} tokens exceed cache_len={self.cache_len}")
    with self._mesh_context():
      return self._teacher_forced(self.params, jnp.asarray(tokens, jnp.int32), prompt_len)

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


def _constrain(x: jax.Array, names) -> jax.Array:
  return nn.with_logical_constraint(x, names)
