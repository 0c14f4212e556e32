"""Sampling rules, determinism, and reuse of compiled programs (tiny random model, fast)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emjax
from emjax import sampling
from emjax.models import intervene
from emjax.models.config import ModelConfig

TINY = ModelConfig(family="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, eos_token_ids=(), name="tiny")


@pytest.fixture(scope="module")
def tiny():
  lm = emjax.random_model(TINY, seed=3)
  # sharpen the random model a little so its next-token distribution is not nearly uniform
  from flax import nnx
  pure = nnx.to_pure_dict(lm.state)
  pure["embed"] = pure["embed"] * 40.0
  nnx.replace_by_pure_dict(lm.state, pure)
  return lm


def next_token_probs(lm, prompt):
  logits = np.asarray(lm.logits(np.asarray([prompt], np.int32)))[0, -1]
  p = np.exp(logits - logits.max())
  return p / p.sum()


def test_sampled_first_tokens_follow_the_softmax(tiny):
  prompt = [5, 7, 11]
  probs = next_token_probs(tiny, prompt)
  n = 4000
  out = emjax.generate(tiny, [prompt], max_new_tokens=1, temperature=1.0, seed=0, num_samples=n, batch_size=512,
                       stop_at_eos=False)
  counts = np.bincount([t[0] for t in out.token_ids], minlength=TINY.vocab_size)
  freq = counts / n
  # 5 standard errors per token, and the total-variation distance is small
  stderr = np.sqrt(probs * (1 - probs) / n)
  assert np.all(np.abs(freq - probs) <= 5 * stderr + 1e-3)
  assert 0.5 * np.abs(freq - probs).sum() < 0.05


def test_temperature_scales_the_logits_and_greedy_is_argmax(tiny):
  prompt = [1, 2, 3, 4]
  logits = np.asarray(tiny.logits(np.asarray([prompt], np.int32)))[0, -1].astype(np.float64)
  greedy = emjax.generate(tiny, [prompt], max_new_tokens=1, temperature=0, stop_at_eos=False)
  assert greedy.token_ids[0][0] == int(np.argmax(logits))
  n = 3000
  for temperature in (0.5, 2.0):
    want = np.exp((logits - logits.max()) / temperature)
    want /= want.sum()
    out = emjax.generate(tiny, [prompt], max_new_tokens=1, temperature=temperature, num_samples=n, seed=1,
                         stop_at_eos=False, batch_size=512)
    freq = np.bincount([t[0] for t in out.token_ids], minlength=TINY.vocab_size) / n
    assert 0.5 * np.abs(freq - want).sum() < 0.05, temperature


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (5, 0.7)])
def test_top_k_and_top_p_never_emit_excluded_tokens(tiny, top_k, top_p):
  prompt = [9, 3, 1]
  probs = next_token_probs(tiny, prompt)
  order = np.argsort(-probs)
  allowed = set(order[:top_k].tolist()) if top_k else set(range(TINY.vocab_size))
  sorted_p = probs[order]
  nucleus = set(order[:int(np.searchsorted(np.cumsum(sorted_p), top_p) + 1)].tolist())
  allowed &= nucleus
  out = emjax.generate(tiny, [prompt], max_new_tokens=1, temperature=1.0, top_k=top_k, top_p=top_p, seed=2,
                       num_samples=600, batch_size=512, stop_at_eos=False)
  seen = {t[0] for t in out.token_ids}
  assert seen <= allowed
  assert len(seen) == len(allowed) or len(allowed) > 3  # the nucleus is actually sampled from


def test_filter_logits_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=50).astype(np.float32) * 3
  for top_k, top_p in [(0, 0.9), (7, 1.0), (10, 0.6)]:
    got = np.asarray(sampling.filter_logits(jax.numpy.asarray(logits), jax.numpy.float32(top_p), top_k))
    order = np.argsort(-logits)
    keep = np.zeros(50, bool)
    k = top_k or 50
    p = np.exp(logits[order[:k]] - logits[order[0]])
    p /= p.sum()
    mass_before = np.cumsum(p) - p
    keep[order[:k][mass_before < top_p]] = True
    assert np.array_equal(got > np.finfo(np.float32).min, keep)


def test_same_seed_same_samples_regardless_of_batching(tiny):
  prompts = [[1, 2], [3, 4, 5, 6, 7], [8]]
  a = emjax.generate(tiny, prompts, max_new_tokens=12, seed=7, num_samples=3, stop_at_eos=False)
  b = emjax.generate(tiny, prompts, max_new_tokens=12, seed=7, num_samples=3, batch_size=2, stop_at_eos=False)
  c = emjax.generate(tiny, prompts[1:2], max_new_tokens=12, seed=7, num_samples=3, stop_at_eos=False)
  assert a.token_ids == b.token_ids
  # one row per call: no prompt's prefill is shared between its samples, same rows
  f = emjax.generate(tiny, prompts, max_new_tokens=12, seed=7, num_samples=3, batch_size=1, stop_at_eos=False)
  assert f.token_ids == a.token_ids
  # prompt 1 alone is prompt index 0 there, so its randomness differs; same prompt index -> same rows
  d = emjax.generate(tiny, prompts[:1], max_new_tokens=12, seed=7, num_samples=3, stop_at_eos=False)
  assert d.token_ids == a.token_ids[:3]
  e = emjax.generate(tiny, prompts, max_new_tokens=12, seed=8, num_samples=3, stop_at_eos=False)
  assert e.token_ids != a.token_ids
  assert len(c.token_ids) == 3


def test_rows_stop_independently_at_eos(tiny):
  lm = emjax.random_model(TINY.replace(eos_token_ids=(0, 1, 2, 3, 4, 5, 6, 7)), seed=3)
  out = emjax.generate(lm, [[9, 10], [11, 12], [13]], max_new_tokens=20, seed=0, num_samples=4, return_logprobs=True)
  lengths = [len(t) for t in out.token_ids]
  assert len(set(lengths)) > 1
  for tokens, finished, stop, lps in zip(out.token_ids, out.finished, out.stop_ids, out.logprobs):
    assert all(t not in range(8) for t in tokens)
    assert finished or len(tokens) == 20
    assert (stop in range(8)) if finished else stop is None
    assert len(lps) == len(tokens) and np.all(lps <= 0)
  # the token each row actually stopped on, not the config's first end-of-turn id
  assert len({s for s in out.stop_ids if s is not None}) > 1


def test_returned_logprobs_equal_a_teacher_forced_forward(tiny):
  out = emjax.generate(tiny, [[4, 5, 6]], max_new_tokens=6, seed=3, return_logprobs=True, stop_at_eos=False)
  seq = [4, 5, 6] + out.token_ids[0]
  logits = np.asarray(tiny.logits(np.asarray([seq], np.int32)))[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  want = [logp[2 + i, t] for i, t in enumerate(out.token_ids[0])]
  np.testing.assert_allclose(out.logprobs[0], want, atol=1e-4)


def test_a_steering_sweep_compiles_once(tiny):
  direction = np.random.default_rng(0).normal(size=TINY.hidden_size).astype(np.float32)
  base = intervene.steer(TINY, 1, direction, scale=1.0)
  emjax.generate(tiny, [[1, 2, 3]], max_new_tokens=4, intervention=base, seed=0, stop_at_eos=False)
  before = sampling._generate_program._cache_size()
  outputs = set()
  for scale in np.linspace(-8, 8, 10):
    out = emjax.generate(tiny, [[1, 2, 3]], max_new_tokens=4, intervention=intervene.with_scale(base, scale), seed=0,
                         stop_at_eos=False)
    outputs.add(tuple(out.token_ids[0]))
  assert sampling._generate_program._cache_size() == before
  assert len(outputs) > 1  # the strength really changes what is generated


def test_bad_arguments_are_reported(tiny):
  with pytest.raises(ValueError, match="max_new_tokens"):
    emjax.generate(tiny, [[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    emjax.generate(tiny, [[1]], max_new_tokens=1, top_p=0)
  with pytest.raises(TypeError, match="list of prompts"):
    emjax.generate(tiny, "hello", max_new_tokens=1)


def test_inverse_cdf_sampler_matches_softmax_and_skips_masked_tokens():
  logits = jnp.asarray([2.0, -1.0, 0.5, float(jnp.finfo(jnp.float32).min), 1.0])
  keys = jax.random.split(jax.random.key(0), 40_000)
  draws = np.asarray(jax.jit(jax.vmap(sampling.sample_categorical, in_axes=(None, 0)))(logits, keys))
  want = np.asarray(jax.nn.softmax(logits))
  got = np.bincount(draws, minlength=5) / len(draws)
  assert got[3] == 0.0
  np.testing.assert_allclose(got, want, atol=0.01)  # 40k draws: std of each share < 0.0025
