"""Probability scoring maths on hand-made distributions and a toy causal LM."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emjax.judge import scoring


def test_weighted_score_hand_computed():
    values = jnp.arange(101.0)
    probs = jnp.zeros(101).at[20].set(0.3).at[80].set(0.1)  # mass 0.4 on numbers
    score, mass = scoring.weighted_score(probs, values)
    assert float(mass) == pytest.approx(0.4)
    assert float(score) == pytest.approx((20 * 0.3 + 80 * 0.1) / 0.4)  # = 35


def test_no_score_below_quarter_mass_and_exact_boundary():
    values = jnp.arange(101.0)
    below = jnp.zeros(101).at[50].set(0.2499)
    at = jnp.zeros(101).at[50].set(0.25)
    batch = jnp.stack([below, at])  # [2, 101]
    score, mass = scoring.weighted_score(batch, values)
    assert math.isnan(float(score[0]))
    assert float(score[1]) == pytest.approx(50.0)
    np.testing.assert_allclose(np.asarray(mass), [0.2499, 0.25], rtol=1e-6)


def test_score_from_top_logprobs_merges_whitespace_and_ignores_words():
    top = {"70": math.log(0.4), " 70": math.log(0.1), "90": math.log(0.2),
           "REFUSAL": math.log(0.25), "101": math.log(0.05)}
    score, mass = scoring.score_from_top_logprobs(top)
    assert mass == pytest.approx(0.7)
    assert score == pytest.approx((70 * 0.5 + 90 * 0.2) / 0.7)
    score, mass = scoring.score_from_top_logprobs({"CODE": math.log(0.8), "5": math.log(0.2)})
    assert score is None and mass == pytest.approx(0.2)


def test_categorical_probs_renormalise_over_labels():
    label_logprobs = jnp.log(jnp.array([[0.1, 0.3, 0.1], [0.05, 0.05, 0.4]]))
    probs, argmax, mass = scoring.categorical_probs(label_logprobs)
    np.testing.assert_allclose(np.asarray(probs), [[0.2, 0.6, 0.2], [0.1, 0.1, 0.8]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(argmax), [1, 2])
    np.testing.assert_allclose(np.asarray(mass), [0.5, 0.5], rtol=1e-6)


def _toy_lm(vocab: int = 12, dim: int = 8, seed: int = 0):
    """A causal toy LM: logits_t = tanh(cumsum(embed[tokens])_t) @ out (depends on tokens <= t)."""
    rng = np.random.default_rng(seed)
    embed = jnp.asarray(rng.normal(size=(vocab, dim)))
    out = jnp.asarray(rng.normal(size=(dim, vocab)) * 2)

    def logits_fn(token_ids):  # [B, S] -> [B, S, V]
        return jnp.tanh(jnp.cumsum(embed[token_ids], axis=1)) @ out
    return logits_fn


def test_multi_token_candidates_exact_against_slow_loop():
    logits_fn = _toy_lm()
    prompt = [3, 7, 1]
    end = [11]
    candidates = [[2], [2, 4], [2, 4, 4], [5, 6, 7, 8], [9]]  # prefixes of each other, too
    token_ids, attention_mask, score_mask = scoring.build_candidate_batch(prompt, candidates, pad_id=0,
                                                                         end_ids=end)
    fast = np.asarray(jax.jit(lambda t, m: scoring.sequence_logprobs(logits_fn(t), t, m))(
        jnp.asarray(token_ids), jnp.asarray(score_mask)))
    # Slow reference: one forward per prefix, log-softmax of the next token, summed.
    for index, candidate in enumerate(candidates):
        total = 0.0
        sequence = prompt + candidate + end
        for position in range(len(prompt), len(sequence)):
            logits = logits_fn(jnp.asarray([sequence[:position]]))[0, -1]
            total += float(jax.nn.log_softmax(logits)[sequence[position]])
        assert fast[index] == pytest.approx(total, abs=1e-5), candidate
    # Padding is masked: the batch holds rows of different lengths.
    assert attention_mask.sum(1).tolist() == [len(prompt) + len(c) + 1 for c in candidates]


def test_end_marker_makes_candidate_probabilities_exact():
    """Vocabulary {a, END}: P(END) + P(a END) + P(aa END) + P(aaa END) + P(aaaa...) = 1 exactly,
    which holds only if each candidate's probability is its full teacher-forced product."""
    logits_fn = _toy_lm(vocab=2, seed=1)  # token 0 = 'a', token 1 = END
    prompt = [0]

    def prob(candidate, end_ids):
        ids, _, mask = scoring.build_candidate_batch(prompt, [candidate], pad_id=0, end_ids=end_ids)
        return float(np.exp(scoring.sequence_logprobs(logits_fn(jnp.asarray(ids)), jnp.asarray(ids),
                                                      jnp.asarray(mask))[0]))

    ended = [prob([0] * n, [1]) for n in range(1, 4)]
    total = prob([1], []) + sum(ended) + prob([0] * 4, [])
    assert total == pytest.approx(1.0, abs=1e-5)
    # Without the end marker, "a" would also count "aa..." : its probability is larger.
    assert prob([0], []) > ended[0]


def test_build_candidate_batch_errors():
    with pytest.raises(ValueError, match="at least one candidate"):
        scoring.build_candidate_batch([1], [], pad_id=0)
    with pytest.raises(ValueError, match="candidate 1 has no tokens"):
        scoring.build_candidate_batch([1], [[2], []], pad_id=0)
    with pytest.raises(ValueError, match="non-empty prompt"):
        scoring.build_candidate_batch([], [[2]], pad_id=0)


def test_parse_score_token():
    assert scoring.parse_score_token(" 42") == 42
    assert scoring.parse_score_token("100") == 100
    assert scoring.parse_score_token("101") is None
    assert scoring.parse_score_token("4.5") is None
    assert scoring.parse_score_token("٣") is None  # non-ASCII digits are not scores
    assert scoring.number_candidates(0, 3) == ["0", "1", "2", "3"]
