"""Mixed precision with float32 master weights (Micikevicius et al. 2018, §3.1).

The train state's parameters are stored in a low-precision dtype
(``model.param_dtype``, e.g. bfloat16): the copy the model reads and
differentiates. The optimizer keeps a float32 copy, the master weights, in its
own state; it updates the master with the float32 gradient and the step hands
the model the master rounded to the parameter dtype. Small updates then
accumulate in the master instead of being rounded away (bfloat16 keeps 8
significant bits). With ``zero.offload_optimizer = host`` the master lives on
the host with the moments: ZeRO-Offload's precision setting (Ren et al. 2021,
§4.1), where the device keeps 2 bytes per parameter and the host 12 (AdamW).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class MasterWeightsState:
  master: Any  # float32 copy of the parameters: what the optimizer updates
  inner: Any  # the wrapped optimizer's state, of the master
  param_dtype: Any = flax.struct.field(pytree_node=False, default=jnp.bfloat16)


def with_master_weights(inner: optax.GradientTransformation,
                        param_dtype=jnp.bfloat16) -> optax.GradientTransformation:
  """``inner`` run on a float32 master copy of ``param_dtype`` parameters.

  ``init`` takes the float32 parameters (before they are rounded to
  ``param_dtype``); ``update`` ignores the low-precision ``params`` and hands
  ``inner`` the master (AdamW's decoupled decay reads it). Apply the returned
  updates with ``apply_updates``, which writes the master.
  """

  def init(params) -> MasterWeightsState:
    master = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return MasterWeightsState(master, inner.init(master), param_dtype)

  def update(grads, state: MasterWeightsState, params=None):
    del params  # the rounded copy; the update reads the master
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    updates, inner_state = inner.update(grads, state.inner, state.master)
    return updates, state.replace(inner=inner_state)

  return optax.GradientTransformation(init, update)


def apply_updates(params, updates, opt_state, learning_rate: jax.Array):
  """(parameters + learning_rate · updates, the optimizer state).

  With master weights (``MasterWeightsState``) the sum is taken on the float32
  master, which the state keeps, and the parameters are its rounding; then
  ``params`` is not read and may be ``None``.
  """
  if not isinstance(opt_state, MasterWeightsState):
    return jax.tree.map(lambda p, u: p + learning_rate * u, params, updates), opt_state
  master = jax.tree.map(lambda m, u: m + learning_rate * u, opt_state.master, updates)
  params = jax.tree.map(lambda m: m.astype(opt_state.param_dtype), master)
  return params, opt_state.replace(master=master)


def round_params(params, opt_state):
  """The parameters the model reads: ``params`` rounded to the master state's dtype, if any."""
  if not isinstance(opt_state, MasterWeightsState):
    return params
  return jax.tree.map(lambda p: p.astype(opt_state.param_dtype), params)
