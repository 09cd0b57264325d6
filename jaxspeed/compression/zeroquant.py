"""ZeroQuant post-training quantization (Yao et al. 2022, arXiv:2206.01861).

* Group-wise symmetric weights (8-bit, or 4-bit MLP in W4/8-A8) and token-wise
  dynamic 8-bit activations (section 4.1).
* Layer-by-layer knowledge distillation, LKD (section 4.2): for each layer l
  in turn, the quantized layer L̂_l is trained to map the float model's hidden
  states h_{l-1} to its h_l, MSE(L_l(h_{l-1}), L̂_l(h_{l-1})); no labels, one
  layer's parameters at a time.
* Export to integer weights (``QuantizedWeight``) run by integer matmuls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxspeed.compression.integer import QuantizedWeight, quantize_to_int
from jaxspeed.compression.qat import (
    FLOAT_BITS,
    QuantGroup,
    fake_quant_interceptor,
    integer_interceptor,
)
from jaxspeed.models.layers import intercept_dense


def _get(tree, name: str):
  for key in name.split("/"):
    tree = tree[key]
  return tree


def _replace(tree, name: str, value):
  """A copy of the nested dict ``tree`` with leaf ``name`` replaced (None removes it)."""
  key, _, rest = name.partition("/")
  out = dict(tree)
  if rest:
    out[key] = _replace(tree[key], rest, value)
  elif value is None:
    del out[key]
  else:
    out[key] = value
  return out


@flax.struct.dataclass
class IntegerModel:
  """A model whose planned weights are integer codes; the rest stays float. A pytree.

  Attributes:
    float_params: the params tree without the quantized leaves.
    weights: weight name -> QuantizedWeight.
    shapes: (weight name, stored float shape) pairs, static, for placeholders.
  """

  float_params: dict
  weights: dict[str, QuantizedWeight]
  shapes: tuple[tuple[str, tuple[int, ...]], ...] = flax.struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(self))

  def apply(self, apply: Callable, *args, **kwargs):
    """``apply(params, *args, **kwargs)`` with integer matmuls; call inside ``jax.jit``.

    The model reads placeholders (zeros created inside the traced function,
    which XLA removes as unused) where quantized weights were; the
    interceptor computes those matmuls from the integer codes.
    """
    params = self.float_params
    for name, shape in self.shapes:
      params = _replace(params, name, jnp.zeros(shape, jnp.float32))
    with intercept_dense(integer_interceptor(self.weights)):
      return apply(params, *args, **kwargs)


def quantize_model(params, plan: Mapping[str, QuantGroup],
                   shapes: Mapping[str, tuple[int, int]]) -> IntegerModel:
  """Integer codes for every planned weight with 4 or 8 weight bits.

  Args:
    params: float params (nested dicts).
    plan: weight name -> QuantGroup (``weight_bits`` 4 or 8; groups of output
      channels as in ``fake_quant_interceptor``).
    shapes: ``matmul_shapes`` of the model.
  """
  weights, stored, rest = {}, {}, params
  for name, group in plan.items():
    if group.weight_bits == FLOAT_BITS:
      continue
    w = _get(params, name)
    weights[name] = quantize_to_int(w.reshape(shapes[name]), group.weight_bits,
                                    out_groups=group.groups)
    stored[name] = tuple(w.shape)
    rest = _replace(rest, name, None)
  return IntegerModel(rest, weights, tuple(stored.items()))


def lkd_layer(apply_layer: Callable, layer_params, plan: Mapping[str, QuantGroup],
              inputs: list[tuple], targets: list[jax.Array], *, steps: int = 100,
              learning_rate: float = 5e-6) -> tuple[dict, list[float]]:
  """LKD for one layer: fit the fake-quantized layer to the float layer's outputs.

  Args:
    apply_layer: ``(layer_params, *inputs[i]) -> output`` of the float layer.
    layer_params: its float params (the starting point).
    plan: the layer's weight names (relative to the layer) -> QuantGroup.
    inputs, targets: per batch, the float model's layer inputs and outputs.
    steps: Adam steps, cycling over the batches (DeepSpeed's example: about 100).
    learning_rate: Adam's (DeepSpeed's example: 5e-6).

  Returns:
    (the distilled float params, the loss of each step).
  """
  step, optimizer = _lkd_step(apply_layer, tuple(sorted(plan.items())), learning_rate)
  params, opt_state, losses = layer_params, optimizer.init(layer_params), []
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, inputs[i % len(inputs)],
                                   targets[i % len(targets)])
    losses.append(float(loss))
  return params, losses


@functools.lru_cache(maxsize=8)
def _lkd_step(apply_layer: Callable, plan: tuple, learning_rate: float):
  """(jitted LKD update, its Adam), shared by layers with the same plan (compiled once)."""
  optimizer = optax.adam(learning_rate)

  def loss_fn(p, batch_inputs, target):
    with intercept_dense(fake_quant_interceptor(dict(plan))):
      out = apply_layer(p, *batch_inputs)
    return jnp.mean(jnp.square(out - target))

  @jax.jit
  def step(p, opt_state, batch_inputs, target):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch_inputs, target)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  return step, optimizer


def layer_plan(plan: Mapping[str, QuantGroup], prefix: str) -> dict[str, QuantGroup]:
  """The entries of ``plan`` under ``prefix/``, named relative to it."""
  return {k[len(prefix) + 1:]: g for k, g in plan.items() if k.startswith(prefix + "/")}
