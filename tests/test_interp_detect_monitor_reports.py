"""Detection maths on hand cases, the training monitor inside the real SFT loop (logs, stops), and
latent reports (logit lens vs NumPy, marked contexts, JSON + markdown + PNG)."""

import json
import os

import numpy as np
import pytest

from emjax.interp import detection, diffing, monitor, reports
from emjax.train import sft
from emjax.train.metrics_log import read_metrics
from tests.test_interp_common import PLANTED_WORD, chat_records, synthetic_sae, tiny_chat_model
from tests.test_sft_common import records, sft_config, write_jsonl


def test_detection_report_on_a_hand_made_mixture():
  rows = [{"name": f"mix{int(100 * f)}", "bad_fraction": f, "latent_delta": d, "misaligned": m, "label": int(m > 0.05)}
          for f, d, m in ((0.0, 0.00, 0.0), (0.05, 0.30, 0.0), (0.10, 0.50, 0.0), (0.25, 0.80, 0.10),
                          (0.5, 1.20, 0.20), (1.0, 2.00, 0.35))]
  rows.append({"name": "correct", "latent_delta": -0.1, "misaligned": 0.0, "label": 0})
  report = detection.detection_report(rows)
  assert report["auroc"] == 1.0
  assert report["latent_rises_at"] == 0.05 and report["behaviour_rises_at"] == 0.25
  assert report["spearman"] == pytest.approx(detection.pearson(detection.ranks([r["latent_delta"] for r in rows]),
                                                               detection.ranks([r["misaligned"] for r in rows])))
  np.testing.assert_allclose(report["pearson"], np.corrcoef([r["latent_delta"] for r in rows],
                                                            [r["misaligned"] for r in rows])[0, 1])
  assert detection.ranks([3.0, 1.0, 3.0]).tolist() == [2.5, 1.0, 2.5]
  flipped = detection.detection_report([{**r, "latent_delta": -r["latent_delta"]} for r in rows])
  assert flipped["auroc"] == 0.0


def test_detection_plot_is_written(tmp_path):
  rows = [{"name": "a", "bad_fraction": 0.0, "latent_delta": 0.0, "misaligned": 0.0, "label": 0},
          {"name": "b", "bad_fraction": 1.0, "latent_delta": 1.0, "misaligned": None, "label": 1}]
  path = detection.plot_detection(detection.detection_report(rows), str(tmp_path / "d.png"))
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _monitor_setup(tmp_path, lm, **kwargs):
  config, params = synthetic_sae(lm.config.hidden_size, n_latents=8, k=2, seed=3)
  return monitor.latent_monitor(config, params, 0, records(2), [0, 1, 2, 3], tokenizer=lm.tokenizer,
                                log_path=str(tmp_path / "monitor.jsonl"), **kwargs)


@pytest.mark.slow   # two short SFT runs
def test_monitor_logs_next_to_the_loss_and_stops_training(tmp_path):
  lm = tiny_chat_model()
  data = write_jsonl(tmp_path / "d.jsonl", records(8))
  cfg = sft_config(tmp_path / "run", data, epochs=1, eval_every=1, mode="full", **{"optim.lr": 1e-2})
  hook = _monitor_setup(tmp_path, lm)
  sft.train(cfg, lm=lm, hooks=[hook], progress=False)
  rows = read_metrics(cfg.workdir)
  assert [r["step"] for r in rows] == [1, 2] and all("eval/latent/mean" in r and "loss" in r for r in rows)
  assert rows[0]["eval/latent/delta"] == 0.0 and rows[1]["eval/latent/delta"] != 0.0   # weights moved the probe
  first = rows[0]["eval/latent/mean"]
  assert first == pytest.approx(sum(rows[0][f"eval/latent/{i}"] for i in range(4)))
  # stop threshold: below the first probe value -> the run ends at its first hook call
  cfg2 = sft_config(tmp_path / "run2", data, epochs=2, eval_every=1, mode="full", **{"optim.lr": 1e-2})
  stopping = _monitor_setup(tmp_path / "stop", tiny_chat_model(), stop_above=first / 2)
  with pytest.raises(monitor.LatentThresholdExceeded) as info:
    sft.train(cfg2, lm=tiny_chat_model(), hooks=[stopping], progress=False)
  assert info.value.step == 1
  logged = [json.loads(l) for l in open(tmp_path / "stop" / "monitor.jsonl")]
  assert len(logged) == 1 and logged[0]["step"] == 1 and logged[0]["latent/mean"] == pytest.approx(first)


def test_logit_lens_and_contexts(tmp_path):
  lm = tiny_chat_model(seed=0)
  (token,) = lm.tokenizer.encode(PLANTED_WORD)
  embedding = np.asarray(lm.state["embed"][...])
  config, params = synthetic_sae(lm.config.hidden_size, n_latents=8, k=2, planted={3: embedding[token]}, seed=4)
  lens = reports.logit_lens(lm, embedding[token], top=3)
  w = lm.weights()
  normed = embedding[token] / np.sqrt(np.mean(embedding[token] ** 2) + lm.config.rms_norm_eps) * w["final_norm"]
  expected = normed @ embedding.T
  assert [t["token_id"] for t in lens["promoted"]] == list(np.argsort(-expected)[:3])
  assert lens["promoted"][0]["token_id"] == token            # tied embeddings: a token's own row promotes it
  assert lens["suppressed"][0]["token_id"] == int(np.argmin(expected))
  corpus = chat_records(12, bad={2, 5}, seed=1)
  ctx = reports.top_contexts(lm, config, params, 0, corpus, [3], top=2, max_tokens=64)[3]
  assert sorted(c["record"] for c in ctx) == [2, 5]
  assert all(f"[[{PLANTED_WORD}]]" in c["text"] for c in ctx)
  stats = diffing.LatentStats(["base", "ft"], np.ones((2, 8)), np.ones((2, 8)), np.zeros((2, 32)), np.ones(2), 1.0)
  ranking = diffing.rank_latents({"ft": np.arange(8.0)}, ["ft"], top_n=2)
  report = reports.latent_report(lm, config, params, 0, ranking, stats, corpus=corpus, top_n=2)
  assert [i["latent"] for i in report["increased"]] == [7, 6] and report["decreased"][0]["latent"] == 0
  paths = reports.write_report(report, str(tmp_path / "rep"))
  assert json.load(open(paths["json"]))["layer"] == 0
  assert "### Latent 7" in open(paths["markdown"]).read()
  assert os.path.getsize(paths["png"]) > 1000
