"""The train state pytree and where each of its leaves lives (ZeRO stages).

ZeRO (Rajbhandari et al. 2020) in sharding terms, for data-parallel group
G = ``data`` x ``fsdp``:

* stage 0: parameters, gradients and optimizer state replicated over G;
* stage 1: optimizer state split over G; each device updates its slice and
  the new parameters are all-gathered;
* stage 2: 1 + gradients reduce-scattered, so accumulated gradients are split;
* stage 3: 2 + parameters split at rest and all-gathered where used (FSDP).

Tensor parallelism is orthogonal: every spec starts from the tensor-parallel
placement given by the logical rules.

ZeRO-Offload (Ren et al. 2021) changes only the memory kind of the optimizer
state: each device's slice (the same PartitionSpecs) lives in its pinned host
memory (``state_shardings``), and the update runs on the host (``host_update``)
for the optimizers that can.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxspeed.optimizers.base import CommunicatingOptimizer
from jaxspeed.optimizers.master import round_params
from jaxspeed.parallel.pipeline import is_layer_name
from jaxspeed.parallel.rules import compute_rules, logical_to_spec, named, zero_spec


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed as one pytree."""

  step: jax.Array  # int32 []
  params: Any
  opt_state: Any
  tokens: jax.Array  # int32 [] tokens seen, for token-based LR schedules
  layer_tokens: jax.Array  # int32 [] tokens summed over the layers that saw them (random-LTD)
  skipped: jax.Array  # int32 [] updates skipped by the non-finite guard
  rng: jax.Array  # uint32 [2] base dropout key


@dataclasses.dataclass(frozen=True)
class StateSpecs:
  """PartitionSpecs of the state, of gradients, and of optimizer-side arrays."""

  state: TrainState  # a TrainState of PartitionSpecs
  grads: Any  # where gradients are accumulated
  update: Any  # where the optimizer update is computed (the ZeRO split for stage >= 1)
  # The parameters' tensor-parallel specs, without ZeRO: where a ZeRO-3 all-gather puts them.
  tensor_parallel: Any = None
  opt_memory_kind: str = "device"  # where the optimizer state lives: "device" or "pinned_host"
  host_update: bool = False  # the optimizer update runs on the host, next to its state
  block_params_memory_kind: str = "device"  # where the blocks' parameters live (ZeRO-Infinity)
  # Gradients leave device memory block by block, to be scaled, clipped and used on the
  # host (ZeRO-Offload's gradient streaming; needs host_update).
  stream_gradients: bool = False

  @property
  def offloaded(self) -> bool:
    """Whether the optimizer state lives in host memory (ZeRO-Offload)."""
    return self.opt_memory_kind != "device"

  @property
  def params_offloaded(self) -> bool:
    """Whether the blocks' parameters live in host memory (ZeRO-Infinity)."""
    return self.block_params_memory_kind != "device"


def in_memory(shardings, kind: str):
  """``shardings`` (a pytree of ``NamedSharding``) with memory kind ``kind``, same specs."""
  return jax.tree.map(lambda s: s.with_memory_kind(kind), shardings)


def params_in_memory(shardings, kind: str):
  """Params ``shardings`` with the blocks' parameters in memory ``kind``, the rest as given."""
  return {name: in_memory(tree, kind) if is_layer_name(name) else tree
          for name, tree in shardings.items()}


def state_shardings(mesh: Mesh, specs: StateSpecs) -> TrainState:
  """The ``NamedSharding`` of every state leaf: the optimizer state in ``specs.opt_memory_kind``
  memory, the blocks' parameters in ``specs.block_params_memory_kind`` memory, the rest in
  device memory."""
  shardings = named(mesh, specs.state)
  if specs.offloaded:
    shardings = shardings.replace(opt_state=in_memory(shardings.opt_state,
                                                      specs.opt_memory_kind))
  if specs.params_offloaded:
    shardings = shardings.replace(params=params_in_memory(shardings.params,
                                                          specs.block_params_memory_kind))
  return shardings


def _zeros(sample_input: jax.ShapeDtypeStruct) -> jax.Array:
  return jnp.zeros(sample_input.shape, sample_input.dtype)


def _boxed_params(model: nn.Module, sample_input):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _zeros(sample_input)))["params"]


def abstract_params(model: nn.Module, sample_input) -> Any:
  """The params tree as ShapeDtypeStructs (nothing is allocated)."""
  return nn.meta.unbox(_boxed_params(model, sample_input))


def tensor_parallel_specs(model: nn.Module, sample_input) -> Any:
  """Each parameter's ``PartitionSpec`` from its logical axes (no data axes)."""
  logical = nn.get_partition_spec(_boxed_params(model, sample_input))
  return jax.tree.map(lambda spec: logical_to_spec(tuple(spec), compute_rules()), logical,
                      is_leaf=lambda x: isinstance(x, P))


def bytes_per_device(tree) -> dict[str, int]:
  """Bytes one device holds of the arrays of ``tree``: ``{"device": ..., "host": ...}``.

  ``tree`` holds arrays or ``ShapeDtypeStruct``s with shardings (``abstract_state``).
  Read from each leaf's sharding (its shard shape, and its memory kind: "device",
  or "pinned_host" / "unpinned_host" counted as host), not from the compiler's
  memory analysis, which does not count host memory.
  """
  held = {"device": 0, "host": 0}
  for leaf in jax.tree.leaves(tree):
    kind = leaf.sharding.memory_kind or "device"
    nbytes = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    held["device" if kind == "device" else "host"] += nbytes
  return held


def state_specs(model: nn.Module, optimizer: optax.GradientTransformation | CommunicatingOptimizer,
                sample_input, mesh: Mesh, zero_stage: int,
                opt_memory_kind: str = "device", host_update: bool = False,
                block_params_memory_kind: str = "device",
                stream_gradients: bool = False) -> StateSpecs:
  """Derives every PartitionSpec from abstract shapes (nothing is allocated).

  Args:
    opt_memory_kind: where the optimizer state lives, "device" or "pinned_host"
      (ZeRO-Offload; ``jaxspeed.parallel.config.OFFLOAD_MEMORY_KINDS``).
    host_update: with the state on the host, run the update there too; else it
      is brought to the device for the update and written back.
    block_params_memory_kind: where the blocks' parameters live; "pinned_host"
      needs ZeRO-3 and a model built with ``params_on_host``.
    stream_gradients: move each block's gradient to host memory as the backward
      pass produces it; needs ``host_update`` and a model built with
      ``params_on_host``.
  """
  if block_params_memory_kind != "device" and zero_stage != 3:
    raise ValueError("parameters live in host memory only at ZeRO stage 3")
  if host_update and (opt_memory_kind == "device"
                      or isinstance(optimizer, CommunicatingOptimizer)):
    raise ValueError("host_update needs the optimizer state in host memory and an optax "
                     "optimizer in HOST_UPDATE_OPTIMIZERS")
  if stream_gradients and not (host_update and getattr(model.config, "params_on_host", False)):
    raise ValueError("stream_gradients needs host_update and a model built with params_on_host")
  tp = tensor_parallel_specs(model, sample_input)
  shapes = abstract_params(model, sample_input)
  zero = jax.tree.map(lambda s, x: zero_spec(s, x.shape, mesh), tp, shapes,
                      is_leaf=lambda x: isinstance(x, P))
  params = zero if zero_stage >= 3 else tp
  opt_param_specs = zero if zero_stage >= 1 else tp
  if isinstance(optimizer, CommunicatingOptimizer):
    opt = optimizer.state_specs(tp, opt_param_specs)
  else:
    abstract_opt = jax.eval_shape(optimizer.init, shapes)
    opt = optax.tree_map_params(optimizer, lambda _, spec: spec, abstract_opt, opt_param_specs,
                                transform_non_params=lambda _: P(),
                                is_leaf=lambda x: isinstance(x, P))
  scalar = P()
  state = TrainState(step=scalar, params=params, opt_state=opt, tokens=scalar,
                     layer_tokens=scalar, skipped=scalar,
                     rng=P(None))
  return StateSpecs(state=state, grads=zero if zero_stage >= 2 else tp, update=opt_param_specs,
                    tensor_parallel=tp,
                    opt_memory_kind=opt_memory_kind, host_update=host_update,
                    block_params_memory_kind=block_params_memory_kind,
                    stream_gradients=stream_gradients)


def _initializer(model: nn.Module, optimizer: optax.GradientTransformation, sample_input,
                 seed: int):
  def init(params: Any = None) -> TrainState:
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    if params is None:
      params = nn.meta.unbox(model.init(init_key, _zeros(sample_input))["params"])
    zero = jnp.zeros((), jnp.int32)
    # The optimizer sees the float32 parameters first: a master copy keeps them.
    opt_state = optimizer.init(params)
    return TrainState(step=zero, params=round_params(params, opt_state), opt_state=opt_state,
                      tokens=zero, layer_tokens=zero, skipped=zero, rng=dropout_key)
  return init


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, sample_input,
               mesh: Mesh, specs: StateSpecs, seed: int, params: Any = None) -> TrainState:
  """Initializes parameters and optimizer state directly in their shardings.

  With ``params`` (e.g. a pretrained model's), those are the parameters, and the
  optimizer state is initialized from them.
  """
  init = _initializer(model, optimizer, sample_input, seed)
  return jax.jit(init, out_shardings=state_shardings(mesh, specs))(params)


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, sample_input,
                   mesh: Mesh, specs: StateSpecs) -> TrainState:
  """ShapeDtypeStructs carrying shardings: the restore target for checkpoints."""
  shapes = jax.eval_shape(_initializer(model, optimizer, sample_input, 0))
  return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                               sharding=sharding),
                      shapes, state_shardings(mesh, specs))
