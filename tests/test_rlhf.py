"""RLHF: the losses against hand-computed values, parallel steps against one device, bad input."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import assert_trees_close

from jaxspeed.config import default_config, validate_rlhf
from jaxspeed.data import ByteTokenizer
from jaxspeed.errors import ConfigError
from jaxspeed.models import GPT, ModelConfig
from jaxspeed.models.losses import cross_entropy
from jaxspeed.parallel import make_mesh
from jaxspeed.rlhf import (
    AdaptiveKLController,
    ValueModel,
    continuation_pairs,
    dpo_loss,
    ema_update,
    gae,
    group_advantages,
    k3_kl,
    kl_penalized_rewards,
    last_token_value,
    make_learner,
    pairwise_region,
    pairwise_reward_loss,
    policy_loss,
    value_loss,
    value_params_from_lm,
)
from jaxspeed.rlhf.data import PreferencePairs, shuffle_words
from jaxspeed.rlhf.pipeline import Context, load_stage, save_stage, tokenizer_fingerprint
from jaxspeed.rlhf.ppo import actor_loss_sum, answer_mask, critic_loss_sum, make_experience_fn
from jaxspeed.rlhf.reward import reward_batch, reward_loss_sum

logsig = lambda x: math.log(1 / (1 + math.exp(-x)))


def test_pairwise_loss_from_divergence_to_the_later_end():
  chosen = jnp.array([[1, 2, 3, 4, 0], [7, 7, 7, 0, 0]])
  chosen_mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], jnp.float32)
  rejected = jnp.array([[1, 2, 5, 0, 0], [7, 7, 7, 0, 0]])
  rejected_mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], jnp.float32)
  region = pairwise_region(chosen, rejected, chosen_mask, rejected_mask)
  # Pair 0 differs from t = 2; the later end is chosen's 4. Pair 1 is identical: the last slot.
  np.testing.assert_array_equal(region, [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]])
  r_c = jnp.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.0, 0.0, 0.0, 0.0, 1.0]])
  r_r = jnp.array([[0.0, 0.1, -0.2, 0.6, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0]])
  expected = [-(logsig(0.5) + logsig(-0.2)) / 2, -logsig(-2.0)]
  np.testing.assert_allclose(pairwise_reward_loss(r_c, r_r, region), expected, rtol=1e-6)
  # The score is the value at the last non-pad token.
  np.testing.assert_allclose(last_token_value(r_c, chosen_mask), [0.4, 0.0])


def test_kl_rewards_and_gae_by_hand():
  # Prompt of 2 tokens, answer of 3: actions at t = 1, 2, 3 of S = 5.
  mask = jnp.asarray(answer_mask(1, 5, 2))
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 0]])
  logp = jnp.array([[0.0, -1.0, -2.0, -0.5, 0.0]])
  ref = jnp.array([[0.0, -1.5, -1.0, -0.5, 0.0]])
  rewards = kl_penalized_rewards(logp, ref, jnp.array([7.0]), mask, 0.1, 5.0)
  # -0.1 (logp - ref) on actions; the score clipped to 5 at the last action.
  np.testing.assert_allclose(rewards, [[0.0, -0.05, 0.1, 5.0, 0.0]], atol=1e-7)

  values = jnp.array([[9.0, 0.5, 1.0, 2.0, 9.0]])  # off-action values must not matter
  g, lam = 0.9, 0.8
  r1, r2, r3 = -0.05, 0.1, 5.0
  v1, v2, v3 = 0.5, 1.0, 2.0
  a3 = r3 - v3
  a2 = r2 + g * v3 - v2 + g * lam * a3
  a1 = r1 + g * v2 - v1 + g * lam * a2
  advantages, returns = gae(rewards, values, mask, g, lam)
  np.testing.assert_allclose(advantages, [[0, a1, a2, a3, 0]], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(returns, [[0, a1 + v1, a2 + v2, a3 + v3, 0]], rtol=1e-6)


def test_ppo_losses_by_hand():
  old = jnp.zeros(3)
  logp = jnp.log(jnp.array([1.5, 1.5, 0.5]))
  adv = jnp.array([1.0, -1.0, 1.0])
  # ratio 1.5, A = 1: clipped to 1.2; A = -1: the unclipped 1.5 is worse; ratio 0.5: unclipped.
  np.testing.assert_allclose(policy_loss(logp, old, adv, 0.2), [-1.2, 1.5, -0.5], rtol=1e-6)
  # v = 1 vs old 0.5 clipped to 0.7; return 2: 0.5 max(1, 1.69).
  np.testing.assert_allclose(value_loss(jnp.array([1.0]), jnp.array([0.5]), jnp.array([2.0]),
                                        0.2), [0.845], rtol=1e-6)
  np.testing.assert_allclose(dpo_loss(jnp.array([-3.0]), jnp.array([-5.0]), jnp.array([-4.0]),
                                      jnp.array([-4.0]), 0.1), [-logsig(0.1 * 2.0)], rtol=1e-6)
  np.testing.assert_allclose(group_advantages(jnp.array([1.0, 3.0, 5.0, 5.0]), 2, eps=0.0)[:2],
                             [-1.0, 1.0])
  np.testing.assert_allclose(k3_kl(jnp.array([-1.0]), jnp.array([-1.0])), [0.0])
  np.testing.assert_allclose(k3_kl(jnp.array([-1.0]), jnp.array([-2.0])),
                             [math.exp(-1) + 1 - 1], rtol=1e-6)
  np.testing.assert_allclose(ema_update({"w": jnp.array(2.0)}, {"w": jnp.array(4.0)}, 0.75)["w"],
                             2.5)
  control = AdaptiveKLController(0.1, target=6.0, horizon=10000)
  assert control.update(12.0, 32) == pytest.approx(0.1 * (1 + 0.2 * 32 / 10000))


def test_preference_pairs_from_text():
  docs = ["the quick brown fox jumps over the lazy dog " * 4, "lorem ipsum dolor sit amet " * 6]
  pairs = continuation_pairs(docs, ByteTokenizer(), 12, 16, 10, seed=0)
  assert len(pairs) >= 8 and pairs.prompts.shape[1] == 12 and pairs.chosen.shape[1] == 16
  assert np.all(np.any(pairs.chosen != pairs.rejected, axis=1))
  for i in range(0, len(pairs), 2):  # shuffled rejections keep the chosen answer's bytes
    np.testing.assert_array_equal(np.sort(pairs.rejected[i]), np.sort(pairs.chosen[i]))
  words = np.frombuffer(b"ab cd ef", np.uint8).astype(np.int32)
  shuffled = shuffle_words(words, 32, np.random.default_rng(0))
  assert sorted(bytes(shuffled.astype(np.uint8)).replace(b" ", b"")) == sorted(b"abcdef")
  with pytest.raises(ConfigError, match=r"rlhf.num_pairs"):
    continuation_pairs(["too short"], ByteTokenizer(), 12, 16, 10, seed=0)
  with pytest.raises(ConfigError, match=r"rlhf.rejected"):
    continuation_pairs(docs, ByteTokenizer(), 12, 16, 10, seed=0, kinds=("reverse",))


MODEL = ModelConfig.from_config(dict(vocab_size=64, num_layers=2, num_heads=4, d_model=32,
                                     d_ff=64, max_seq_len=16))
SEQ = 12


def _optim():
  optim = default_config().optim
  optim.update(learning_rate=1e-2, warmup=0)
  return optim


def _mesh(parallel, devices=None):
  return make_mesh({"data": 1, "fsdp": 1, "stage": 1, "expert": 1, "sequence": 1, "tensor": 1,
                    **parallel}, jax.devices() if devices is None else devices)


def _tokens(rows, seed):
  return np.random.default_rng(seed).integers(0, MODEL.vocab_size, (rows, SEQ)).astype(np.int32)


def _losses(learner, params, batches):
  state = learner.start(params)
  losses = []
  for i, batch in enumerate(batches):
    state, metrics = learner.train_step(state, learner.to_device(batch), i)
    losses.append(float(metrics["loss"]))
  return losses


def test_reward_model_steps_match_single_device():
  pairs = PreferencePairs(_tokens(8, 0)[:, :4], _tokens(8, 1)[:, :8], _tokens(8, 2)[:, :8])
  batches = [reward_batch(pairs, np.arange(8))] * 4
  model = ValueModel(MODEL)
  results = []
  for parallel, stage, devices in (({}, 0, jax.devices()[:1]),
                                   ({"data": 2, "fsdp": 2, "tensor": 2}, 3, None)):
    learner = make_learner(model, _optim(), 4, _mesh(parallel, devices), stage, SEQ,
                           reward_loss_sum(model))
    lm = make_learner(GPT(MODEL), _optim(), 1, learner.mesh, stage, SEQ).init_params(0)
    with jax.set_mesh(learner.mesh):
      results.append(_losses(learner, value_params_from_lm(learner.init_params(1), lm),
                             batches))
  np.testing.assert_allclose(results[1], results[0], rtol=1e-4)
  assert results[0][0] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores ~equal
  assert results[0][-1] < results[0][0]


def test_ppo_experience_and_updates_match_single_device():
  tokens = _tokens(8, 3)
  mask = answer_mask(8, SEQ, 4)
  ppo = default_config().rlhf.ppo
  outcomes = []
  for parallel, stage, devices in (({}, 0, jax.devices()[:1]),
                                   ({"data": 2, "fsdp": 2, "tensor": 2}, 3, None)):
    mesh = _mesh(parallel, devices)
    actor = make_learner(GPT(MODEL), _optim(), 2, mesh, stage, SEQ,
                         actor_loss_sum(GPT(MODEL), ppo.cliprange, 0.0))
    critic = make_learner(ValueModel(MODEL), _optim(), 2, mesh, stage, SEQ,
                          critic_loss_sum(ValueModel(MODEL), ppo.cliprange_value))
    experience = make_experience_fn(GPT(MODEL), ValueModel(MODEL), ValueModel(MODEL), mesh, ppo)
    with jax.set_mesh(mesh):
      actor_params, critic_params = actor.init_params(0), critic.init_params(1)
      placed = actor.to_device({"inputs": tokens, "action_mask": mask})
      arrays, stats = experience(actor_params, actor_params, critic_params, critic_params,
                                 placed["inputs"], placed["action_mask"], jnp.float32(0.1))
      # The actor is its own reference: no KL, so the reward is the clipped score alone.
      assert abs(float(stats["kl"])) < 1e-6
      assert abs(float(stats["score"])) < 5
      np.testing.assert_allclose(np.asarray(arrays["rewards"]).sum(1).mean(),
                                 float(stats["score"]), rtol=1e-4)
      actor_batch = dict(placed, old_logprobs=arrays["old_logprobs"],
                         advantages=arrays["advantages"])
      critic_batch = dict(placed, old_values=arrays["old_values"], returns=arrays["returns"])
      outcomes.append([float(stats["score"]),
                       *_losses(actor, actor_params, [actor_batch] * 2),
                       *_losses(critic, critic_params, [critic_batch] * 2)])
  np.testing.assert_allclose(outcomes[1], outcomes[0], rtol=1e-4, atol=1e-6)


def _context(tmp_path, tokenizer=None):
  config = default_config()
  context = Context(config, str(tmp_path), _mesh({}, jax.devices()[:1]), tokenizer or
                    ByteTokenizer(), GPT(MODEL), ValueModel(MODEL), None, None)
  return context


def _fake_stage(directory, value_head, tokenizer):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "stage.json"), "w") as f:
    json.dump({"stage": "x", "value_head": value_head, "tokenizer": tokenizer}, f)


def test_loading_the_wrong_model_is_refused(tmp_path):
  context = _context(tmp_path)
  reward = make_learner(ValueModel(MODEL), _optim(), 1, context.mesh, 0, SEQ)
  with pytest.raises(ConfigError, match=r"rlhf.reward_workdir.*no finished reward step"):
    load_stage(context, "reward", reward, True)
  byte = tokenizer_fingerprint(ByteTokenizer())
  _fake_stage(tmp_path / "reward", False, byte)  # an SFT model where the reward model goes
  with pytest.raises(ConfigError, match=r"rlhf.reward_workdir.*without a value head"):
    load_stage(context, "reward", reward, True)
  _fake_stage(tmp_path / "reward", True, "bpe-512-0123456789abcdef")
  with pytest.raises(ConfigError, match=r"rlhf.reward_workdir.*tokenizer bpe-512"):
    load_stage(context, "reward", reward, True)


def test_saved_step_restores(tmp_path):
  context = _context(tmp_path)
  reward = make_learner(ValueModel(MODEL), _optim(), 1, context.mesh, 0, SEQ)
  with jax.set_mesh(context.mesh):
    state = reward.start(reward.init_params(0))
    save_stage(context, "reward", state, True, {})
    restored = load_stage(context, "reward", reward, True)
  assert_trees_close(restored, state.params, rtol=0)
  with pytest.raises(ConfigError, match="model"):
    value_params_from_lm(restored, {"embed": restored["lm"]["embed"]})


@pytest.mark.parametrize("key, value, match", [
    ("rlhf.grpo.group_size", 1, "rlhf.grpo.group_size"),
    ("parallel.stage", 2, "parallel.stage"),
    ("optim.name", "onebit_adam", "optim.name"),
    ("rlhf.answer_len", 200, "rlhf.answer_len"),
    ("rlhf.ppo.gamma", 1.5, "rlhf.ppo.gamma"),
    ("rlhf.ppo.batch_size", 12, "rlhf.ppo.batch_size"),
])
def test_bad_rlhf_config(key, value, match):
  config = default_config()
  config.parallel.data = 8
  node = config
  *path, last = key.split(".")
  for part in path:
    node = node[part]
  if key == "parallel.stage":
    config.parallel.data = 4
  node[last] = value
  assert isinstance(config, ml_collections.ConfigDict)
  with pytest.raises(ConfigError, match=match):
    validate_rlhf(config, 8)


def test_ptx_term_adds_the_weighted_pretraining_loss():
  model = GPT(MODEL)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32))["params"]
  tokens = jnp.asarray(_tokens(2, 5))
  mask = jnp.asarray(answer_mask(2, SEQ, 4))
  batch = {"inputs": tokens, "action_mask": mask, "old_logprobs": jnp.zeros((2, SEQ)),
           "advantages": jnp.ones((2, SEQ))}
  ptx = {"ptx_inputs": tokens[:, :-1], "ptx_targets": tokens[:, 1:]}
  plain, sums = actor_loss_sum(model, 0.2, 0.0)(params, batch, None, True)
  mixed, mixed_sums = actor_loss_sum(model, 0.2, 27.8)(params, {**batch, **ptx}, None, True)
  ce, n = cross_entropy(model.apply({"params": params}, ptx["ptx_inputs"]), ptx["ptx_targets"])
  # objective / actions = policy loss + unsup_coef x the PTX loss per token.
  np.testing.assert_allclose(mixed / sums["tokens"], plain / sums["tokens"] + 27.8 * ce / n,
                             rtol=1e-5)
  assert float(mixed_sums["loss_sum"]) == pytest.approx(float(sums["loss_sum"]))
