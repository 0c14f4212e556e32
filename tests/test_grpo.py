"""GRPO maths and the jitted step: NumPy references, ratio/KL invariants, reference = base model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emjax.models import lm as lm_lib
from emjax.models import lora as lora_lib
from emjax.models.config import ModelConfig
from emjax.train import grpo, optim

TINY = ModelConfig(family="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=16, pad_token_id=0, name="tiny")


# ----------------------------------------------------------------------------- NumPy references

def np_advantages(rewards, group, estimator, eps=1e-4):
  out = np.zeros_like(rewards)
  for start in range(0, len(rewards), group):
    r = rewards[start:start + group]
    valid = np.isfinite(r)
    v = r[valid]
    adv = np.zeros_like(r)
    if len(v) >= 2:
      if estimator == "grpo":
        adv[valid] = (v - v.mean()) / (v.std(ddof=1) + eps)
      elif estimator == "dr_grpo":
        adv[valid] = v - v.mean()
      else:  # rloo: reward minus the mean of the other rows of the group
        adv[valid] = [v[i] - np.delete(v, i).mean() for i in range(len(v))]
    out[start:start + group] = adv
  return out


def np_loss_and_grad(logp, old, ref, adv, mask, eps_low, eps_high, beta, aggregation):
  """Loss and d loss / d logp, written out by hand."""
  n, c = mask.shape
  if aggregation == "token_mean":
    w = mask / mask.sum()
  elif aggregation == "sequence_mean":
    w = mask / mask.sum(1, keepdims=True) / n
  else:
    w = mask / (n * c)
  a = adv[:, None]
  ratio = np.exp(logp - old)
  clipped = np.clip(ratio, 1 - eps_low, 1 + eps_high)
  unclipped_wins = ratio * a <= clipped * a
  policy = -np.minimum(ratio * a, clipped * a)
  kl = np.exp(ref - logp) - (ref - logp) - 1
  loss = np.sum(w * (policy + beta * kl))
  grad = w * (np.where(unclipped_wins, -a * ratio, 0.0) + beta * (1 - np.exp(ref - logp)))
  return loss, grad


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_group_advantages_match_numpy(estimator):
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=24).astype(np.float32)
  rewards[[3, 9, 10, 11]] = np.nan   # failed grades; the 3rd group keeps one valid row -> all zero
  got = np.asarray(grpo.group_advantages(jnp.asarray(rewards), 4, estimator))
  want = np_advantages(rewards.astype(np.float64), 4, estimator)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[8:12] == 0)
  # rloo is the GRPO centring scaled by G/(G-1) on a full group
  if estimator == "rloo":
    np.testing.assert_allclose(got[4:8], (rewards[4:8] - rewards[4:8].mean()) * 4 / 3, rtol=1e-5)


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_loss_and_gradient_match_numpy(aggregation):
  rng = np.random.default_rng(1)
  n, c = 6, 7
  logp = rng.normal(-2.0, 0.5, size=(n, c))
  old = logp + rng.normal(0, 0.3, size=(n, c))     # far enough from logp that some tokens clip
  ref = logp + rng.normal(0, 0.2, size=(n, c))
  adv = rng.normal(size=n)
  mask = (rng.random((n, c)) < 0.8).astype(np.float64)
  mask[:, 0] = 1
  settings = grpo.GrpoSettings(eps_low=0.2, eps_high=0.28, beta=0.1, aggregation=aggregation, group_size=2)

  def loss_fn(lp):
    terms = grpo.token_loss_terms(lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32),
                                  jnp.asarray(adv, jnp.float32), settings)
    return jnp.sum(terms["loss"] * grpo.aggregation_weights(jnp.asarray(mask), aggregation))

  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logp, jnp.float32))
  want_loss, want_grad = np_loss_and_grad(logp, old, ref, adv, mask, 0.2, 0.28, 0.1, aggregation)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)
  terms = grpo.token_loss_terms(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), settings)
  clipped = np.asarray(terms["clipped"]) > 0
  assert clipped.any() and not clipped.all()       # the test exercises both branches
  # where the clipped branch wins, only the KL term pushes on logp
  _, kl_only = np_loss_and_grad(logp, old, ref, np.zeros(n), mask, 0.2, 0.28, 0.1, aggregation)
  np.testing.assert_allclose(np.asarray(grad)[clipped], kl_only[clipped], rtol=1e-4, atol=1e-8)


def test_ratio_is_one_and_nothing_clips_with_one_update():
  logp = jnp.asarray(np.random.default_rng(2).normal(-3, 1, size=(4, 5)), jnp.float32)
  adv = jnp.asarray([2.0, -2.0, 0.5, -0.5])
  settings = grpo.GrpoSettings(eps_low=0.01, eps_high=0.01, beta=0.0, group_size=2)
  terms = grpo.token_loss_terms(logp, jax.lax.stop_gradient(logp), None, adv, settings)
  assert np.all(np.asarray(terms["ratio"]) == 1.0)
  assert np.all(np.asarray(terms["clipped"]) == 0.0)
  # ... so the gradient is REINFORCE's: -A per token
  grad = jax.grad(lambda lp: jnp.sum(grpo.token_loss_terms(lp, jax.lax.stop_gradient(lp), None, adv,
                                                           settings)["loss"]))(logp)
  np.testing.assert_array_equal(np.asarray(grad), -np.broadcast_to(np.asarray(adv)[:, None], (4, 5)))


# ----------------------------------------------------------------------------- the step on a tiny model

def _rollout_batch(accum=1, n=8, completion_len=6, seed=0, group=4):
  """Rows in GRPO's layout: n / group prompts of different lengths, each repeated for its group."""
  rng = np.random.default_rng(seed)
  distinct = [list(rng.integers(1, 32, size=rng.integers(2, 6))) for _ in range(n // group)]
  prompts = [prompt for prompt in distinct for _ in range(group)]
  completions = [list(rng.integers(1, 32, size=rng.integers(1, completion_len + 1))) for _ in range(n)]
  rewards = rng.random(n).astype(np.float32)
  return grpo.build_batch(prompts, completions, rewards, completion_len=completion_len, pad_id=0, accum=accum,
                          min_prompt_len=8)


def _step(mode, settings, lm, adapter=None, accum=1, batch=None):
  optimizer = optim.adamw(optim.lr_schedule(1e-2, 10), clip_norm=None)
  if mode == "lora":
    spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="all")
    scales = lora_lib.layer_scales(spec, TINY)
    trainable = adapter if adapter is not None else lora_lib.init_adapter(spec, TINY, jax.random.PRNGKey(0))
    frozen, reference = lm.state, None
  else:
    scales, frozen, reference = None, None, lm.state
    trainable = jax.tree.map(lambda x: x + 0, lm.state)
  step = jax.jit(grpo.make_step_fn(lm.graphdef, optimizer, settings, mode=mode, completion_len=6,
                                   compute_dtype=jnp.float32))
  batch = batch if batch is not None else _rollout_batch(accum)
  return step(trainable, optimizer.init(trainable), frozen, reference, scales, grpo.batch_to_device(batch)), scales


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_kl_is_zero_and_ratio_one_at_step_zero(mode):
  lm = lm_lib.random_model(TINY, seed=0)
  settings = grpo.GrpoSettings(beta=0.5, group_size=4)
  (_, _, metrics), _ = _step(mode, settings, lm)
  assert float(metrics["kl"]) == 0.0
  assert float(metrics["clip_fraction"]) == 0.0
  assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-6
  assert float(metrics["grad_norm"]) > 0


def test_reference_is_the_base_model_with_the_adapter_off():
  lm = lm_lib.random_model(TINY, seed=0)
  batch = _rollout_batch()
  ids, mask = batch["ids"][0], batch["attention_mask"][0]
  # 1) the reference logprobs (lora=None on the policy's own frozen state) equal the base model's
  ref_logp, _ = grpo.policy_logprobs(lm.graphdef, lm.state, jnp.asarray(ids), jnp.asarray(mask), 6, lora=None,
                                     compute_dtype=jnp.float32)
  logits = np.asarray(lm.logits(ids, mask), np.float64)                    # [M, T, V]
  logz = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)
  t = ids.shape[1]
  base = np.take_along_axis(logz[:, t - 7:t - 1], ids[:, t - 6:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(np.asarray(ref_logp), base, atol=1e-5)
  # 2) with a non-zero adapter, the step's KL is k3(base logp - policy logp): the reference ignores the adapter
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="all")
  adapter = lora_lib.init_adapter(spec, TINY, jax.random.PRNGKey(0))
  adapter = {p: {"a": ab["a"], "b": 0.5 * jax.random.normal(jax.random.PRNGKey(3), ab["b"].shape)}
             for p, ab in adapter.items()}
  scales = lora_lib.layer_scales(spec, TINY)
  policy_logp, _ = grpo.policy_logprobs(lm.graphdef, lm.state, jnp.asarray(ids), jnp.asarray(mask), 6,
                                        lora=lora_lib.forward_lora(adapter, scales), compute_dtype=jnp.float32)
  policy_logp = np.asarray(policy_logp, np.float64)
  assert np.abs(policy_logp - base).max() > 1e-2
  cmask = batch["completion_mask"][0]
  k3 = np.exp(base - policy_logp) - (base - policy_logp) - 1
  want_kl = (k3 * cmask).sum() / cmask.sum()
  (_, _, metrics), _ = _step("lora", grpo.GrpoSettings(beta=0.1, group_size=4), lm, adapter=adapter, batch=batch)
  np.testing.assert_allclose(float(metrics["kl"]), want_kl, rtol=1e-4)


def test_micro_batches_give_the_same_update():
  # sequence_mean is the aggregation most easily broken by micro-batching (per-row means over the whole batch)
  lm = lm_lib.random_model(TINY, seed=1)
  settings = grpo.GrpoSettings(beta=0.1, group_size=4, aggregation="sequence_mean")
  (one, _, m1), _ = _step("lora", settings, lm, accum=1)
  (two, _, m2), _ = _step("lora", settings, lm, accum=2)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5, atol=1e-7)


def test_shared_prompts_give_the_same_logprobs_and_update():
  lm = lm_lib.random_model(TINY, seed=2)
  batch = _rollout_batch(n=8, group=4, seed=3)
  ids, mask = jnp.asarray(batch["ids"][0]), jnp.asarray(batch["attention_mask"][0])
  assert not np.array_equal(batch["ids"][0][0, :8], batch["ids"][0][4, :8])   # two different prompts
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="all")
  adapter = lora_lib.init_adapter(spec, TINY, jax.random.PRNGKey(0))
  adapter = {p: {"a": ab["a"], "b": 0.3 * jax.random.normal(jax.random.PRNGKey(4), ab["b"].shape)}
             for p, ab in adapter.items()}
  lora = lora_lib.forward_lora(adapter, lora_lib.layer_scales(spec, TINY))
  each, ent_each = grpo.policy_logprobs(lm.graphdef, lm.state, ids, mask, 6, lora=lora, compute_dtype=jnp.float32)
  shared, ent_shared = grpo.policy_logprobs(lm.graphdef, lm.state, ids, mask, 6, lora=lora,
                                            compute_dtype=jnp.float32, group_size=4)
  cmask = batch["completion_mask"][0]
  np.testing.assert_allclose(np.asarray(shared)[cmask], np.asarray(each)[cmask], atol=2e-6)
  np.testing.assert_allclose(np.asarray(ent_shared)[cmask], np.asarray(ent_each)[cmask], atol=2e-6)
  # the whole step (policy and reference, forward and backward) with and without sharing
  on = grpo.GrpoSettings(beta=0.1, group_size=4, share_prompts=True)
  off = grpo.GrpoSettings(beta=0.1, group_size=4, share_prompts=False)
  (a1, _, m1), _ = _step("lora", on, lm, adapter=adapter, batch=batch)
  (a2, _, m2), _ = _step("lora", off, lm, adapter=adapter, batch=batch)
  for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2)):   # Adam's steps are ~1e-2 (lr): far above this
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4)
  for key in ("loss", "kl", "grad_norm", "entropy"):
    np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-5, atol=1e-7)
  # sharing applies only when micro-batches hold whole groups
  assert grpo.prompt_sharing(on, 8) == 4 and grpo.prompt_sharing(on, 6) == 1 and grpo.prompt_sharing(off, 8) == 1


def test_completions_end_with_the_stop_token_the_policy_sampled():
  assert grpo._completion_ids([4, 5], 7, limit=6) == [4, 5, 7]       # not some other end-of-turn id
  assert grpo._completion_ids([4, 5], None, limit=6) == [4, 5]       # ran to the length limit
  assert grpo._completion_ids([1, 2, 3], 7, limit=3) == [1, 2, 3]


def test_build_batch_layout():
  batch = grpo.build_batch([[5, 6], [7]], [[1, 2, 3], []], [1.0, 0.0], completion_len=4, pad_id=0, min_prompt_len=4)
  np.testing.assert_array_equal(batch["ids"][0], [[0, 0, 5, 6, 1, 2, 3, 0], [0, 0, 0, 7, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["attention_mask"][0].astype(int), [[0, 0, 1, 1, 1, 1, 1, 0],
                                                                         [0, 0, 0, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["completion_mask"][0].astype(int), [[1, 1, 1, 0], [0, 0, 0, 0]])
  exact = grpo.build_batch([[5, 6], [7]], [[1], [2]], [1.0, 0.0], completion_len=1, pad_id=0, prompt_len=3)
  np.testing.assert_array_equal(exact["ids"][0], [[0, 5, 6, 1], [0, 0, 7, 2]])   # width 3, not a power of two
  with pytest.raises(ValueError, match="shorter than the longest prompt"):
    grpo.build_batch([[5, 6]], [[1]], [1.0], completion_len=1, pad_id=0, prompt_len=1)
  with pytest.raises(ValueError, match="grad_accum=3"):
    grpo.build_batch([[1]] * 4, [[1]] * 4, [0.0] * 4, completion_len=2, pad_id=0, accum=3)


def test_settings_reject_bad_names():
  with pytest.raises(ValueError, match="estimator"):
    grpo.GrpoSettings(estimator="ppo")
  with pytest.raises(ValueError, match="aggregation"):
    grpo.GrpoSettings(aggregation="mean")
  with pytest.raises(ValueError, match="at least 2"):
    grpo.GrpoSettings(group_size=1)
