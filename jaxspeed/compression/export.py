"""Integer models on disk: one safetensors file of int8 / packed-int4 codes, scales, floats.

Tensor names: ``<weight>.codes`` (int8, or uint8 packed int4), ``<weight>.scales``
(float32), and the float leaves under their params path; the metadata records
each quantized weight's bits and stored float shape.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxspeed.compression.integer import QuantizedWeight
from jaxspeed.compression.zeroquant import IntegerModel


def save_integer_model(path: str | os.PathLike, model: IntegerModel) -> int:
  """Writes ``model`` to ``path``; returns the file size in bytes."""
  from safetensors.numpy import save_file

  floats = traverse_util.flatten_dict(model.float_params, sep="/")
  tensors = {f"float:{k}": np.asarray(v) for k, v in floats.items()}
  for name, w in model.weights.items():
    tensors[f"{name}.codes"] = np.asarray(w.codes)
    tensors[f"{name}.scales"] = np.asarray(w.scales)
  meta = {name: {"bits": w.bits, "shape": dict(model.shapes)[name]}
          for name, w in model.weights.items()}
  save_file(tensors, str(path), metadata={"quantized": json.dumps(meta)})
  return os.path.getsize(path)


def load_integer_model(path: str | os.PathLike) -> IntegerModel:
  """Inverse of ``save_integer_model``."""
  from safetensors import safe_open

  with safe_open(str(path), framework="numpy") as f:
    meta = json.loads(f.metadata()["quantized"])
    tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
  floats = {k[len("float:"):]: jnp.asarray(v) for k, v in tensors.items()
            if k.startswith("float:")}
  weights = {name: QuantizedWeight(jnp.asarray(tensors[f"{name}.codes"]),
                                   jnp.asarray(tensors[f"{name}.scales"]), m["bits"])
             for name, m in meta.items()}
  shapes = tuple((name, tuple(m["shape"])) for name, m in meta.items())
  return IntegerModel(traverse_util.unflatten_dict(floats, sep="/"), weights, shapes)
