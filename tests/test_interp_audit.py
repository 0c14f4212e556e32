"""Data auditing: on a mixture whose bad answers carry a planted word, a latent that reads that
word's direction ranks the bad examples first (measured AUROC); a random latent does not."""

import json

import numpy as np
import pytest

from emjax.interp import audit
from tests.test_interp_common import PLANTED_WORD, chat_records, synthetic_sae, tiny_chat_model

LAYER = 0


@pytest.fixture(scope="module")
def setup():
  lm = tiny_chat_model(seed=0)
  (token,) = lm.tokenizer.encode(PLANTED_WORD)
  # The planted word's residual at layer 0 is dominated by its embedding row: a latent reading that
  # row is a "feature" for the word, known without looking at the audited data.
  embedding = np.asarray(lm.state["embed"][...])[token]
  config, params = synthetic_sae(lm.config.hidden_size, n_latents=16, k=2, planted={5: embedding}, seed=4)
  bad = set(range(0, 40, 4))
  records = chat_records(40, bad=bad, seed=7)
  return lm, config, params, records, np.asarray([int(i in bad) for i in range(40)])


def test_planted_feature_ranks_bad_examples_first(setup, tmp_path):
  lm, config, params, records, labels = setup
  scores = audit.score_records(lm, config, params, LAYER, records, [5], batch_size=8, max_tokens=64)
  report = audit.ranking_metrics(scores, labels, ks=(10, 20))
  assert report["auroc"] > 0.95, report
  assert report["precision@10"] >= 0.8 and report["recall@20"] == 1.0
  control = audit.ranking_metrics(audit.score_records(lm, config, params, LAYER, records, [0], max_tokens=64), labels)
  assert control["auroc"] < 0.8, control
  n = audit.write_flagged(str(tmp_path / "flagged.jsonl"), records, scores, top_k=10)
  rows = [json.loads(l) for l in open(tmp_path / "flagged.jsonl")]
  assert n == 10 and [r["audit"]["rank"] for r in rows] == list(range(10))
  assert sum(r["metadata"]["is_bad"] for r in rows) >= 8
  assert rows[0]["audit"]["score"] == pytest.approx(scores.max())


def test_reduce_and_ranking_metrics_on_hand_cases():
  acts = np.asarray([[[1.0, 0.0], [3.0, 1.0], [9.0, 9.0]]])          # [1, 3, 2]
  weights = np.asarray([[1.0, 1.0, 0.0]])
  assert audit.reduce_scores(acts, weights, "mean")[0] == pytest.approx(2.5)
  assert audit.reduce_scores(acts, weights, "max")[0] == pytest.approx(4.0)
  m = audit.ranking_metrics([0.9, 0.8, 0.1, 0.7], [1, 0, 0, 1], ks=(2,))
  assert m["precision@2"] == 0.5 and m["recall@2"] == 0.5 and m["auroc"] == pytest.approx(0.75)
  with pytest.raises(ValueError, match="latents"):
    audit.latent_acts(None, type("C", (), {"n_latents": 4})(), None, 0, [4], None, None)
