"""DeepSpeed-Chat's Hybrid Engine: one actor, trained in one placement, generating in another.

Training keeps the actor's parameters where ZeRO and tensor parallelism put
them (under ZeRO-3, each split over the data axes as well). Generation is
latency-bound and reads every weight at every token, so it wants them
tensor-parallel only, whole on each data replica, with each replica decoding
its own rows (DeepSpeed gathers the ZeRO-3 partitions and swaps in inference
kernels for ``generate()``). Here
the switch is one jitted identity with the inference shardings as outputs
(``Generator.placement``):
XLA turns it into all-gathers between devices, nothing goes through the
host, and the generation programs (``jaxspeed.inference.Generator``) compile
once and are reused with each iteration's parameters.
"""

from __future__ import annotations

import time

import numpy as np

from jaxspeed.comm.hlo import communication
from jaxspeed.inference import Generator, SamplingConfig
from jaxspeed.models.gpt import GPT
from jaxspeed.parallel.mesh import DATA_AXES


class HybridEngine:
  """Generates from the current training parameters of a ``GPT`` actor.

  Args:
    model: the actor.
    params: its parameters in the training shardings (used to build the engine).
    mesh: the training mesh; generation splits heads/MLP/vocabulary over its
      ``tensor`` axis.
    cache_len: KV-cache slots per row (prompt + answer).
  """

  def __init__(self, model: GPT, params, mesh, cache_len: int):
    self.generator = Generator(model, params, cache_len=cache_len, mesh=mesh,
                               batch_axes=DATA_AXES)
    self.generate_seconds = 0.0

  def reshard_communication(self, params) -> dict[str, float]:
    """Collective bytes and rounds of the train -> inference switch, from its compiled HLO."""
    text = self.generator.placement.lower(params).compile().as_text()
    return communication(text, len(self.generator.mesh.devices.flat))

  def generate(self, params, prompts: np.ndarray, answer_len: int, sampling: SamplingConfig,
               seed: int) -> np.ndarray:
    """prompts [B, P] -> [B, P + answer_len] tokens sampled from ``params``.

    Adds the wall time (switch + generation) to ``generate_seconds``.
    """
    start = time.perf_counter()
    self.generator.load_params(params)
    answers = self.generator.generate([list(p) for p in prompts], answer_len,
                                      sampling=sampling, seed=seed)
    if any(len(a) != answer_len for a in answers):
      raise ValueError(f"answers of {sorted({len(a) for a in answers})} tokens, expected "
                       f"{answer_len}: cache_len={self.generator.cache_len} is too short")
    tokens = np.concatenate([prompts, np.asarray(answers, np.int32)], axis=1)
    self.generate_seconds += time.perf_counter() - start
    return tokens
