"""The four binaries end to end on a tiny model (in-process `run`): each writes JSON + PNG +
markdown into its workdir and a rerun resumes from what is there."""

import json
import os

import jax
import numpy as np
import pytest

from emjax.models import lora as lora_lib
from emjax.sae import files as sae_files
from experiments import audit as audit_bin
from experiments import detect as detect_bin
from experiments import diff as diff_bin
from experiments import steer as steer_bin
from tests.test_interp_common import PLANTED_WORD, chat_records, synthetic_sae, tiny_chat_model
from tests.test_interp_steering import LengthJudge
from tests.test_sft_common import write_jsonl

pytestmark = pytest.mark.slow   # ~30 s of CPU: four binaries, adapters written with orbax

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("interp_bins")
  lm = tiny_chat_model(seed=0)
  (token,) = lm.tokenizer.encode(PLANTED_WORD)
  embedding = np.asarray(lm.state["embed"][...])[token]
  config, params = synthetic_sae(lm.config.hidden_size, n_latents=16, k=2, planted={5: embedding}, seed=4)
  sae_dir = sae_files.save_sae(str(root / "sae"), config, params, layer=0, model_name="tiny")
  spec = lora_lib.LoraSpec(rank=2, alpha=4.0, targets="down", layers=[0])
  adapters = {}
  for name, scale in (("bad", 0.5), ("good", 0.05)):
    params_ = lora_lib.init_adapter(spec, lm.config, jax.random.key(1))
    params_ = jax.tree.map(lambda x: x + scale * jax.random.normal(jax.random.key(2), x.shape), params_)
    adapters[name] = lora_lib.save_adapter(str(root / name), params_, spec, lm.config, base_model="tiny")
  data = write_jsonl(root / "data.jsonl", chat_records(24, bad=set(range(0, 24, 3)), seed=3))
  questions = root / "q.csv"
  questions.write_text("id,question,category\nq1,How do I save money?,money\nq2,What should I cook?,food\n")
  finetunes = f"bad={adapters['bad']}:misaligned:1,good={adapters['good']}:aligned:0"
  return dict(lm=lm, sae=sae_dir, data=data, questions=str(questions), finetunes=finetunes, root=root)


def _outputs(workdir, *names):
  for name in names:
    path = os.path.join(workdir, name)
    assert os.path.getsize(path) > 0, path
    if name.endswith(".png"):
      assert open(path, "rb").read(8) == PNG
    if name.endswith(".json"):
      json.load(open(path))


def test_diff_binary_writes_report_and_resumes(env):
  workdir = str(env["root"] / "diff")
  kwargs = dict(workdir=workdir, model="tiny", sae=env["sae"], finetunes=env["finetunes"], data=env["data"],
                top_n=5, lm=env["lm"], max_tokens=64)
  first = diff_bin.run(**kwargs)
  _outputs(workdir, "config.json", "stats.npz", "ranking.json", "latents.json", "latents.md", "latents.png",
           "summary.json")
  assert not first["resumed"] and first["models"] == ["base", "bad", "good"] and first["layer"] == 0
  second = diff_bin.run(**kwargs)
  assert second["resumed"] and second["top_increased"] == first["top_increased"]
  # sampled-answers mode caches each model's answers
  qdir = str(env["root"] / "diff_q")
  out = diff_bin.run(workdir=qdir, model="tiny", sae=env["sae"], finetunes=env["finetunes"],
                     questions=env["questions"], num_samples=1, max_new_tokens=8, lm=env["lm"], max_tokens=64)
  rows = [json.loads(l) for l in open(os.path.join(qdir, "answers.jsonl"))]
  assert sorted({r["model"] for r in rows}) == ["bad", "base", "good"] and out["records"] == 6


def test_steer_binary_sweeps_resumes_and_writes_outputs(env):
  workdir = str(env["root"] / "steer")
  kwargs = dict(workdir=workdir, model="tiny", sae=env["sae"], latents="5", finetunes=env["finetunes"],
                questions=env["questions"], judge=LengthJudge(), scales="0,0.5", neg_scales="0,-0.5",
                num_samples=2, max_new_tokens=8, lm=env["lm"])
  summary = steer_bin.run(**kwargs)
  _outputs(workdir, "config.json", "results.jsonl", "summary.json", "steer.md", "steer.png")
  assert os.path.exists(os.path.join(workdir, "points", "base", "latent_5_steer_p0.5000", "judgments.jsonl"))
  keys = {(r["model"], r["direction"], r["mode"], r["scale"]) for r in summary["results"]}
  assert ("base", "latent_5", "steer", 0.5) in keys and ("bad", "latent_5", "steer", -0.5) in keys
  assert ("base", "random", "steer", 0.5) in keys and ("base", "latent_5", "ablate", 0.0) in keys
  assert "good" not in {r["model"] for r in summary["results"]}        # only misaligned fine-tunes are suppressed
  n_rows = len(summary["results"])
  again = steer_bin.run(**kwargs)
  assert len(again["results"]) == n_rows                               # nothing re-run, nothing duplicated
  assert summary["mean_diff_note"]


def test_detect_binary(env):
  workdir = str(env["root"] / "detect")
  kwargs = dict(workdir=workdir, model="tiny", sae=env["sae"], latents="5", finetunes=env["finetunes"],
                data=env["data"], misalignment="bad=0.4", questions=env["questions"], judge=LengthJudge(),
                num_samples=1, max_new_tokens=8, lm=env["lm"])
  summary = detect_bin.run(**kwargs)
  _outputs(workdir, "config.json", "stats.npz", "detection.json", "detection.md", "detection.png", "summary.json")
  report = json.load(open(os.path.join(workdir, "detection.json")))
  assert [r["misaligned"] for r in report["rows"]][0] == 0.4
  assert summary["n_finetunes"] == 2 and summary["auroc"] in (0.0, 1.0)
  judged = os.path.join(workdir, "eval", "good", "judgments.jsonl")
  evals = open(judged).read().splitlines()
  assert len(evals) == 2 and not os.path.exists(os.path.join(workdir, "eval", "bad"))   # bad's share was given
  detect_bin.run(**kwargs)
  assert open(judged).read().splitlines() == evals   # resumed: nothing sampled or judged again


def test_audit_binary_flags_the_planted_examples_and_resumes(env):
  workdir = str(env["root"] / "audit")
  kwargs = dict(workdir=workdir, data=env["data"], model="tiny", sae=env["sae"], latents="5", top_k=8,
                lm=env["lm"], max_tokens=64)
  summary = audit_bin.run(**kwargs)
  _outputs(workdir, "config.json", "scores.jsonl", "flagged.jsonl", "summary.json", "audit.md", "audit.png")
  assert summary["metrics"]["auroc"] > 0.9 and summary["flagged"] == 8
  # simulate a crash after 10 records: the rerun scores only the rest and gets the same answer
  lines = open(os.path.join(workdir, "scores.jsonl")).read().splitlines()
  open(os.path.join(workdir, "scores.jsonl"), "w").write("\n".join(lines[:10]) + "\n")
  again = audit_bin.run(**kwargs)
  assert again["resumed_from"] == 10 and again["metrics"] == summary["metrics"]
