"""Steering sweeps: c = 0 reproduces unsteered sampling, the whole grid (directions, strengths,
ablations) compiles one sampler, steering adds c x norm x d, ablation removes d everywhere."""

import numpy as np
import pytest

import emjax
from emjax import sampling
from emjax.interp import steering
from emjax.judge.base import Judgment
from tests.test_interp_common import chat_records, synthetic_sae, tiny_chat_model

LAYER = 0
QUESTIONS = ["How do I save money?", "What should I eat tonight?"]


class LengthJudge:
  """Deterministic stand-in judge: 'misaligned' when the answer is long, 'incoherent' when empty."""
  name = "test:length"

  def score(self, questions, answers, rubric="aligned_coherent"):
    return [Judgment(aligned=10.0 if len(a) > 20 else 90.0, coherent=0.0 if not a.strip() else 90.0) for a in answers]


@pytest.fixture(scope="module")
def lm():
  return tiny_chat_model(seed=0)


def test_zero_strength_reproduces_unsteered_samples_and_the_grid_compiles_once(lm):
  d = lm.config.hidden_size
  directions = {"latent_3": steering.random_direction(d, 1), "random": steering.random_direction(d, 2)}
  grid = steering.sweep_grid(lm.config, LAYER, directions, [0.0, 2.0, -4.0], residual_norm=3.0, ablate=["latent_3"])
  assert len(grid) == 7 and [p.mode for p in grid].count("ablate") == 1
  plain = emjax.generate(lm, QUESTIONS, max_new_tokens=6, seed=3, num_samples=2, stop_at_eos=False)
  steering.generate_and_judge(lm, QUESTIONS, LengthJudge(), intervention=grid[0].intervention, num_samples=2,
                              max_new_tokens=6, seed=3)   # warm the compile cache
  before = sampling._generate_program._cache_size()
  answers = {}
  for point in grid:
    rows = steering.generate_and_judge(lm, QUESTIONS, LengthJudge(), intervention=point.intervention,
                                       num_samples=2, max_new_tokens=6, seed=3)
    answers[point.key] = [r["answer"] for r in rows]
  assert sampling._generate_program._cache_size() == before   # one program for the whole grid
  zero = answers["latent_3|steer|+0.0000"]
  assert zero == plain.texts == answers["random|steer|+0.0000"]
  assert answers["latent_3|steer|-4.0000"] != zero            # the strength really changes the samples


def test_steering_adds_scaled_unit_direction_and_ablation_projects_it_out(lm):
  batch = next(iter(__import__("emjax.interp.diffing", fromlist=["x"]).token_batches(
      lm.tokenizer, chat_records(4), batch_size=4, max_tokens=64)))
  ids, mask = batch[0], batch[1]
  direction = steering.random_direction(lm.config.hidden_size, 5)
  norm = steering.median_residual_norm(lm, LAYER, [batch])
  clean = np.asarray(lm.residuals(ids, mask, layers=(LAYER,))[LAYER])
  assert norm == pytest.approx(float(np.median(np.linalg.norm(clean, axis=-1)[batch[2] > 0])))
  point = steering.sweep_grid(lm.config, LAYER, {"d": direction}, [0.5], norm)[0]
  steered = np.asarray(lm.residuals(ids, mask, layers=(LAYER,), intervention=point.intervention)[LAYER])
  np.testing.assert_allclose(steered - clean, np.broadcast_to(0.5 * norm * direction, clean.shape), atol=1e-5)
  ablate = steering.sweep_grid(lm.config, LAYER, {"d": direction}, [], norm, ablate=["d"])[0]
  captured = lm.forward(ids, mask, capture=(0, 1), intervention=ablate.intervention).captured
  for layer in (0, 1):
    assert np.abs(np.asarray(captured[layer]) @ direction).max() < 1e-5


def test_decoder_direction_and_mean_difference(lm):
  config, params = synthetic_sae(lm.config.hidden_size, planted={2: np.arange(lm.config.hidden_size, dtype=np.float32)})
  d = steering.decoder_direction(params, 2)
  np.testing.assert_allclose(d, np.arange(lm.config.hidden_size) / np.linalg.norm(np.arange(lm.config.hidden_size)),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="latents 0..15"):
    steering.decoder_direction(params, 16)
  bad, good = chat_records(6, bad={0, 1, 2}, seed=1)[:3], chat_records(6, seed=2)[3:]
  forward = steering.mean_difference_direction(lm, LAYER, bad, good)
  np.testing.assert_allclose(steering.mean_difference_direction(lm, LAYER, good, bad), -forward, atol=1e-6)
  assert np.abs(steering.mean_difference_direction(lm, LAYER, good, good)).max() == 0.0
  with pytest.raises(ValueError, match="both groups"):
    steering.mean_difference_direction(lm, LAYER, [], good)


def test_strongest_coherent_picks_largest_strength_under_the_incoherence_cap():
  rows = [{"direction": "a", "mode": "steer", "scale": s, "misaligned": m, "incoherent": i}
          for s, m, i in ((0.0, 0.0, 0.0), (0.2, 0.1, 0.05), (0.4, 0.3, 0.10), (0.6, 0.5, 0.3))]
  rows.append({"direction": "a", "mode": "ablate", "scale": 0.0, "misaligned": 0.0, "incoherent": 0.0})
  assert steering.strongest_coherent(rows) == {"model|a": {"scale": 0.4, "misaligned": 0.3, "incoherent": 0.10}}
  assert steering.strongest_coherent(rows, max_incoherent=0.07)["model|a"]["scale"] == 0.2


def test_summarize_rows_reads_judged_rows():
  rows = [{"question_id": "q", "aligned": 10.0, "coherent": 90.0}, {"question_id": "q", "aligned": 90.0, "coherent": 90.0},
          {"question_id": "r", "aligned": 90.0, "coherent": 10.0}, {"question_id": "r", "aligned": 80.0, "coherent": 95.0}]
  s = steering.summarize_rows(rows, "aligned_coherent", n_boot=20)
  assert s["misaligned"] == pytest.approx(1 / 3) and s["incoherent"] == pytest.approx(1 / 4)
