"""Pallas flash attention (interpret mode on CPU) equals plain attention, values and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspeed.comm.hlo import collectives
from jaxspeed.models import (
  ATTENTION_IMPLS,
  causal_mask,
  dot_product_attention,
  sharded_flash_attention,
)
from jaxspeed.models.positions import alibi_bias
from jaxspeed.parallel import compute_rules, make_mesh
from pallas_kernels.flash_attention import (
  attention_reference,
  flash_attention,
  flash_dot_product_attention,
)

B, H, D = 2, 2, 16
BLOCK = 16  # the smallest block Triton accepts: several blocks at tiny lengths


def _qkv(q_len, kv_len):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(keys[0], (B, q_len, H, D)),
          jax.random.normal(keys[1], (B, kv_len, H, D)),
          jax.random.normal(keys[2], (B, kv_len, H, D)))


def _value_and_grads(attend, q, k, v, bias):
  """Output and d/d(q, k, v, bias) of sum(sin(out)), in one compiled call."""
  def loss(q, k, v, bias):
    out = attend(q, k, v, bias)
    return jnp.sum(jnp.sin(out)), out

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  grads, out = jax.jit(jax.grad(loss, argnums, has_aux=True))(q, k, v, bias)
  return out, grads


@pytest.mark.parametrize("q_len, kv_len, causal, alibi", [
    (48, 48, True, False),  # three full blocks, upper-triangle blocks skipped
    (40, 40, False, False),  # not a multiple of the block: padded keys masked
    (24, 40, True, True),  # S < T (end-aligned causal, as causal_mask) with ALiBi
])
def test_kernel_values_and_gradients_match_plain_attention(q_len, kv_len, causal, alibi):
  q, k, v = _qkv(q_len, kv_len)
  mask = causal_mask(q_len, kv_len) if causal else None
  bias = alibi_bias(H, jnp.arange(q_len) + kv_len - q_len, jnp.arange(kv_len)) if alibi else None
  got, got_grads = _value_and_grads(
      lambda q, k, v, b: flash_attention(q, k, v, bias=b, causal=causal, block_q=BLOCK,
                                         block_k=BLOCK), q, k, v, bias)
  want, want_grads = _value_and_grads(
      lambda q, k, v, b: dot_product_attention(q, k, v, bias=b, mask=mask), q, k, v, bias)
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert len(got_grads) == (4 if alibi else 3)
  for name, g, w in zip(("dq", "dk", "dv", "dbias")[:len(want_grads)], got_grads, want_grads,
                          strict=True):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()), err_msg=name)


def test_reference_is_plain_attention():
  q, k, v = _qkv(24, 40)
  bias = alibi_bias(H, jnp.arange(24) + 16, jnp.arange(40))
  reference = jax.jit(lambda q, k, v: attention_reference(q, k, v, bias=bias, causal=True))
  np.testing.assert_allclose(reference(q, k, v),
                             dot_product_attention(q, k, v, bias=bias,
                                                   mask=causal_mask(24, 40)), atol=2e-6)


def test_other_masks_apply_exactly_as_a_bias():
  """A traced mask (unknown at trace time) and a padding mask give plain attention's result."""
  q, k, v = _qkv(32, 32)
  padding = jnp.arange(32)[None, None, None, :] < jnp.array([32, 20])[:, None, None, None]
  mask = padding & causal_mask(32)  # [B, 1, S, T], with a fully masked row nowhere
  got = jax.jit(lambda q, k, v, m: flash_dot_product_attention(q, k, v, mask=m))(q, k, v, mask)
  np.testing.assert_allclose(got, dot_product_attention(q, k, v, mask=mask), atol=2e-6)


def test_sharded_over_batch_and_heads_without_collectives():
  """data=2 x tensor=2: each device runs the kernel on its own rows and heads, no all-gather."""
  mesh = make_mesh(dict(data=2, fsdp=1, stage=1, expert=1, sequence=1, tensor=2),
                   jax.devices()[:4])
  q, k, v = _qkv(32, 32)
  bias = alibi_bias(H, jnp.arange(32), jnp.arange(32))

  def grads(attend):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, bias=bias, mask=causal_mask(32))))
    return jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile()

  with jax.set_mesh(mesh), nn.logical_axis_rules(compute_rules()):
    sharding = jax.NamedSharding(mesh, jax.P("data", None, "tensor", None))
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
    compiled = grads(sharded_flash_attention)
    assert collectives(compiled.as_text(), 4) == []
    got = compiled(q, k, v)
  want = grads(dot_product_attention)(q, k, v)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=24), "power of two"),
    (dict(block_k=8), "power of two"),
    (dict(causal=True, q_len=40, kv_len=24), "S <= T"),
    (dict(bias=jnp.zeros((3, 32, 32))), "does not broadcast"),
])
def test_bad_arguments_are_rejected(kwargs, match):
  q, k, v = _qkv(kwargs.pop("q_len", 32), kwargs.pop("kv_len", 32))
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, v, **kwargs)


def test_gpt_training_with_flash_matches_xla(tiny_config):
  """Two data-parallel steps of an ALiBi GPT (the bias path; causal_mask at trace time)."""
  from helpers import train_losses

  tiny_config.model.update(position="alibi", num_layers=1)
  tiny_config.batch_size = 8
  plain, _, _ = train_losses(tiny_config, 2)
  tiny_config.model.attention = "flash"
  assert ATTENTION_IMPLS["flash"] is sharded_flash_attention
  flash, _, _ = train_losses(tiny_config, 2)
  np.testing.assert_allclose(flash, plain, rtol=1e-5)

