"""Generate text from a trained checkpoint with the KV-cache engine.

  python -m experiments.generate --workdir=results/demo --prompt="The " --prompt="def " \
      --config.inference.max_new_tokens=80 --config.inference.temperature=0.8 \
      --config.inference.tensor_parallel.tp_size=2 \
      --config.inference.kv_compression.policy=h2o --config.inference.kv_compression.budget=0.5

The model, tokenizer and data settings are those the run in ``--workdir`` was
trained with; ``--config.inference.*`` choose how to generate.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from experiments import common

CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt_tiny.py",
                                         "Config file; only its inference section is used.")
WORKDIR = flags.DEFINE_string("workdir", "results/train", "A training run's directory.")
PROMPTS = flags.DEFINE_multi_string("prompt", ["The "], "Prompts (one row each).")
STREAM = flags.DEFINE_bool("stream", True, "Print the first row's tokens as they come.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  common.setup_devices()
  from jaxspeed.checkpoint import load_run_config
  from jaxspeed.inference import builders

  # Bad input (no run in --workdir, a bad config) becomes one line in common.run_app.
  requested = common.config_value(CONFIG)
  config = load_run_config(WORKDIR.value, requested)
  config.inference = requested.inference
  setup, params = builders.load_params(config, WORKDIR.value)
  tokenizer = setup.tokenizer
  generator = builders.generator_from_config(
      config, setup.model, params, punct_ids=builders.punctuation_ids(tokenizer))
  prompts = [[int(t) for t in tokenizer.encode(p)] for p in PROMPTS.value]

  def stream(step, tokens, active):
    del step
    if active[0]:
      print(tokenizer.decode([int(tokens[0])]), end="", flush=True)

  if STREAM.value:
    print(PROMPTS.value[0], end="", flush=True)
  rows = generator.generate(prompts, config.inference.max_new_tokens,
                            sampling=builders.sampling_config(config),
                            seed=config.inference.seed,
                            stop_tokens=builders.stop_tokens(config),
                            on_token=stream if STREAM.value else None)
  if STREAM.value:
    print("\n")
  for prompt, ids in zip(PROMPTS.value, rows):
    print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(ids)}\n")


if __name__ == "__main__":
  common.run_app(main)
