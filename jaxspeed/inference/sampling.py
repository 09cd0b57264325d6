"""Text sampling from a decoder by full recomputation over a fixed-size window.

One compiled program generates every token (static shapes: a [1, max_len]
buffer and a ``fori_loop``), so sampling never recompiles. It recomputes the
whole window per token, which is fine for the short samples printed after
training.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def sample_tokens(model: nn.Module, params, prompt: list[int], num_tokens: int, *,
                  max_len: int, rng: jax.Array, temperature: float = 0.8) -> list[int]:
  """Samples ``num_tokens`` tokens after ``prompt`` (greedy when temperature is 0).

  Args:
    model: a decoder whose ``apply`` maps tokens [1, S] to logits [1, S, V].
    prompt: token ids; at least one token, shorter than ``max_len``.
    max_len: the model's context; generation stops when the buffer is full.

  Returns:
    The generated ids (without the prompt).
  """
  if not 0 < len(prompt) < max_len:
    raise ValueError(f"prompt length {len(prompt)} must be in [1, {max_len})")
  num_tokens = min(num_tokens, max_len - len(prompt))
  buffer = jnp.zeros((1, max_len), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))

  @jax.jit
  def generate(params, buffer, rng):
    def body(i, carry):
      tokens, key = carry
      pos = len(prompt) + i
      logits = model.apply({"params": params}, tokens)[0, pos - 1]
      key, sub = jax.random.split(key)
      if temperature > 0:
        nxt = jax.random.categorical(sub, logits / temperature)
      else:
        nxt = jnp.argmax(logits)
      return tokens.at[0, pos].set(nxt.astype(jnp.int32)), key
    tokens, _ = jax.lax.fori_loop(0, num_tokens, body, (buffer, rng))
    return tokens

  tokens = generate(params, buffer, rng)
  return [int(t) for t in jax.device_get(tokens[0, len(prompt): len(prompt) + num_tokens])]
