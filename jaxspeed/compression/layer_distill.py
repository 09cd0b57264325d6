"""Knowledge distillation and layer reduction for XTC (Wu et al. 2022, arXiv:2206.01859).

XTC trains a binary or ternary student in one stage with distillation on the
teacher's logits and hidden states, optionally after initializing a shallower
student from chosen teacher layers (e.g. 12 -> 6 from layers 1, 3, 5, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxspeed.models.layers import Block


def soft_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array,
                       temperature: float = 1.0) -> jax.Array:
  """Mean over tokens of -Σ softmax(t/T) · log_softmax(s/T) · T² (Hinton et al. 2015).

  Args:
    student_logits, teacher_logits: [..., V].
  """
  t = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return -jnp.mean(jnp.sum(t * s, axis=-1)) * temperature**2


def apply_with_hidden(model: nn.Module, params, *args, **kwargs
                      ) -> tuple[jax.Array, list[jax.Array]]:
  """(model output, [output of each transformer layer]) in layer order.

  Layer outputs are captured with flax's ``capture_intermediates`` on ``Block``s.
  """
  out, state = model.apply({"params": params}, *args, **kwargs,
                           capture_intermediates=lambda m, _: isinstance(m, Block),
                           mutable=["intermediates"])
  inter = state["intermediates"]
  inter = inter.get("encoder", inter)  # BertForMaskedLM nests its encoder
  layers = sorted((k for k in inter if k.startswith("layer_")), key=lambda k: int(k[6:]))
  return out, [inter[k]["__call__"][0] for k in layers]


def hidden_mse(student_hidden: Sequence[jax.Array], teacher_hidden: Sequence[jax.Array],
               teacher_layers: Sequence[int]) -> jax.Array:
  """Mean of MSE(student layer i, teacher layer teacher_layers[i]) over student layers."""
  if len(student_hidden) != len(teacher_layers):
    raise ValueError(f"{len(student_hidden)} student layers, {len(teacher_layers)} teacher "
                     "layers to match")
  return sum(jnp.mean(jnp.square(s - teacher_hidden[t]))
             for s, t in zip(student_hidden, teacher_layers)) / len(teacher_layers)


def layer_reduction_init(teacher_params: dict, teacher_layers: Sequence[int]) -> dict:
  """Student params: layer i is a copy of teacher layer ``teacher_layers[i]``; every
  non-layer module (embeddings, final norm, heads) is copied as is.

  DeepSpeed's ``layer_reduction`` (``teacher_layer`` and ``other_module_name``).
  Works on GPT and BERT params (``layer_{i}`` at the top or under ``encoder``).
  """
  def reduce(tree: dict) -> dict:
    if not any(k.startswith("layer_") for k in tree):
      return {k: reduce(v) if isinstance(v, dict) else v for k, v in tree.items()}
    out = {k: v for k, v in tree.items() if not k.startswith("layer_")}
    for i, t in enumerate(teacher_layers):
      if f"layer_{t}" not in tree:
        raise ValueError(f"teacher has no layer {t}; its layers: "
                         f"{sorted(k for k in tree if k.startswith('layer_'))}")
      out[f"layer_{i}"] = tree[f"layer_{t}"]
    return out
  return reduce(teacher_params)
