"""XTC: binary / ternary students distilled from a float GPT, with and without layer reduction.

A byte-level GPT teacher is trained on the default corpus (Python's docs) with
the library trainer. Students run every attention and MLP weight matmul with
ternary (2-bit) or binary (1-bit) weights and 8-bit token-wise activations
(straight-through gradients) and train in one stage on distillation only:
soft cross-entropy to the teacher's logits plus MSE to its hidden states. The
reduced student has half the layers, initialized from teacher layers 1, 3, ...
(XTC's 12 -> 6 from 1, 3, 5, ...). Reports validation loss against the real
next bytes and sizes (quantized linear weights at 1 or 2 bits + one float32
scale per matrix; embeddings, norms and biases float32 as in XTC).

  python -m experiments.xtc [--quick]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import jaxspeed
from experiments import common
from jaxspeed.compression.layer_distill import (
    apply_with_hidden,
    hidden_mse,
    layer_reduction_init,
    soft_cross_entropy,
)
from jaxspeed.compression.qat import (
    QuantGroup,
    assign_groups,
    fake_quant_interceptor,
    matmul_shapes,
)
from jaxspeed.config import default_config
from jaxspeed.models import GPT
from jaxspeed.models.layers import intercept_dense
from jaxspeed.training import cross_entropy

QUICK = flags.DEFINE_bool("quick", False, "Smoke run: a few steps of each model.")
TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 600, "Teacher training steps.")
STUDENT_STEPS = flags.DEFINE_integer("student_steps", 400, "Distillation steps per student.")
STUDENT_LR = flags.DEFINE_float("student_lr", 1e-3, "Student AdamW peak learning rate.")
HIDDEN_WEIGHT = flags.DEFINE_float("hidden_weight", 1.0, "Weight of the hidden-state MSE.")


def teacher_config(steps: int, quick: bool):
  c = default_config()
  c.steps, c.batch_size, c.seq_len = steps, 16, 32 if quick else 64
  c.log_every = c.eval_every = c.checkpoint_every = steps
  c.eval_batches, c.sample_tokens = 2 if quick else 4, 0
  c.model.num_layers, c.model.num_heads = 2 if quick else 4, 4
  c.model.d_model, c.model.d_ff = (64, 256) if quick else (128, 512)
  c.model.max_seq_len = c.seq_len
  c.optim.learning_rate, c.optim.warmup = 3e-3, max(1, steps // 10)
  return c


def planned_bytes(shapes: dict, plan: dict, bits: int) -> int:
  """Bytes of the planned matmul weights at ``bits`` (+ one float32 scale each if < 32)."""
  return sum(-(-k * n * bits // 8) + 4 * (bits < 32)
             for name, (k, n) in shapes.items() if name in plan)


def main(argv):
  del argv
  common.setup_devices()
  quick = QUICK.value
  t_steps, s_steps = (20, 10) if quick else (TEACHER_STEPS.value, STUDENT_STEPS.value)
  config = teacher_config(t_steps, quick)
  # The quick run trains the teacher on one device (no data-parallel compile cost).
  setup = jaxspeed.build(config, devices=jax.devices()[:1] if quick else None)
  model = setup.model
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    for _ in range(t_steps):
      state, _ = setup.train_step(state, setup.to_device(setup.train_data.next_batch()))
    teacher = jax.device_get(state.params)
  val = [setup.val_data.batch_at(i) for i in range(config.eval_batches)]

  def val_loss_fn(mdl, plan=None):
    """params -> mean validation loss of ``mdl`` (fake-quantized per ``plan``)."""
    @jax.jit
    def loss(p, batch):
      with intercept_dense(None if plan is None else fake_quant_interceptor(plan)):
        return cross_entropy(mdl.apply({"params": p}, batch["inputs"]), batch["targets"])

    def mean(params) -> float:
      sums = [loss(params, b) for b in val]
      return float(sum(s for s, _ in sums) / sum(n for _, n in sums))
    return mean

  sample = jnp.zeros((1, config.seq_len), jnp.int32)
  apply = lambda mdl: (lambda p, x: mdl.apply({"params": p}, x))
  total_float = sum(x.size * 4 for x in jax.tree.leaves(teacher))
  teacher_loss = val_loss_fn(model)(teacher)
  rows = [{"model": "teacher (float32)", "layers": config.model.num_layers,
           "weight_bits": 32, "val_loss": teacher_loss, "size_ratio": 1.0,
           "linear_size_ratio": 1.0, "val_loss_no_kd_init": teacher_loss}]
  teacher_shapes = matmul_shapes(apply(model), teacher, sample)

  half = config.model.num_layers // 2
  plan_patterns = (r"attention/(query|key|value|out)$", r"mlp/(wi|wo)$")
  variants = [("ternary", 2, list(range(config.model.num_layers))),
              ("binary", 1, list(range(config.model.num_layers))),
              ("binary_reduced", 1, list(range(1, config.model.num_layers, 2))[:half])]
  for name, bits, layers in variants:
    cfg = dataclasses.replace(setup.model_config, num_layers=len(layers))
    student = GPT(cfg)
    params = layer_reduction_init(teacher, layers)
    shapes = matmul_shapes(apply(student), params, sample)
    plan = assign_groups([QuantGroup(plan_patterns, bits, 8)], list(shapes))
    schedule = optax.warmup_cosine_decay_schedule(0.0, STUDENT_LR.value,
                                                  max(1, s_steps // 10), s_steps)
    optimizer = optax.adamw(schedule, weight_decay=0.0)

    def kd_loss(p, x, t_logits, t_hidden, student=student, plan=plan, layers=layers):
      with intercept_dense(fake_quant_interceptor(plan)):
        logits, hidden = apply_with_hidden(student, p, x)
      return (soft_cross_entropy(logits, t_logits)
              + HIDDEN_WEIGHT.value * hidden_mse(hidden, t_hidden, layers))

    @jax.jit
    def step(p, opt_state, teacher_p, x, kd_loss=kd_loss, optimizer=optimizer):
      t_logits, t_hidden = apply_with_hidden(model, teacher_p, x)
      loss, grads = jax.value_and_grad(kd_loss)(p, x, t_logits, t_hidden)
      updates, opt_state = optimizer.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    opt_state = optimizer.init(params)
    for _ in range(s_steps):
      params, opt_state, _ = step(params, opt_state, teacher,
                                  setup.train_data.next_batch()["inputs"])
    # The teacher's linear weights of the same kind (all layers) are what XTC compresses.
    teacher_linear = planned_bytes(teacher_shapes, assign_groups(
        [QuantGroup(plan_patterns)], list(teacher_shapes)), 32)
    student_linear = planned_bytes(shapes, plan, bits)
    student_loss = val_loss_fn(student, plan)
    rows.append({"model": f"{name} student (KD)", "layers": len(layers), "weight_bits": bits,
                 "val_loss": student_loss(params),
                 "size_ratio": total_float / (total_float - teacher_linear + student_linear),
                 "linear_size_ratio": teacher_linear / student_linear,
                 "val_loss_no_kd_init": student_loss(layer_reduction_init(teacher, layers))})

  by = {r["model"].split()[0]: r for r in rows}
  summary = {"teacher_val_loss": by["teacher"]["val_loss"],
             "ternary_val_loss": by["ternary"]["val_loss"],
             "binary_val_loss": by["binary"]["val_loss"],
             "binary_reduced_val_loss": by["binary_reduced"]["val_loss"],
             "ternary_size_ratio": by["ternary"]["size_ratio"],
             "binary_size_ratio": by["binary"]["size_ratio"],
             "binary_reduced_size_ratio": by["binary_reduced"]["size_ratio"],
             "binary_linear_size_ratio": by["binary"]["linear_size_ratio"],
             "binary_reduced_linear_size_ratio": by["binary_reduced"]["linear_size_ratio"]}
  header = (f"Byte-level GPT teacher ({config.model.num_layers} layers, d_model "
            f"{config.model.d_model}) trained {t_steps} steps on Python's docs; students "
            f"distilled {s_steps} steps (logits + hidden states), 8-bit token-wise "
            "activations. `val_loss_no_kd_init` is the student at initialization (teacher "
            "weights quantized, before distillation). Sizes: quantized linear weights at 1/2 "
            "bits + a float32 scale; embeddings, norms, biases float32.\n\n"
            "Paper (XTC, BERT-base on GLUE): binary/ternary with KD near-lossless at 32x "
            "smaller linear weights; 50x with 12 -> 6 layer reduction keeping 97% accuracy.")
  common.write_results("xtc", summary, rows,
                       {"teacher_steps": t_steps, "student_steps": s_steps,
                        "student_lr": STUDENT_LR.value, "hidden_weight": HIDDEN_WEIGHT.value,
                        "quick": quick}, header)


if __name__ == "__main__":
  app.run(main)
