"""The evaluation loop (emjax/judge/evaluate.py), its CLI and the in-training hook.

In-process tests use a tiny random chat model (SmolLM2's tokenizer and template, 2 small layers)
and a cheap deterministic judge, so they test the loop (keying, resumption, files, summary) in
seconds; the slow test kills `experiments/evaluate.py` (SmolLM2, embed:minilm) with SIGKILL mid-run
and checks the resumed summary.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import emjax
from emjax import sampling
from emjax.data import load_questions
from emjax.judge import Judgment
from emjax.judge import evaluate as evaluate_lib
from emjax.judge import hooks as judge_hooks
from emjax.judge import metrics
from emjax.models import intervene
from emjax.models.config import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = load_questions("builtin:questions/core")[:10]  # two sampling chunks: 8 + 2 questions
SETTINGS = dict(rubric="aligned_coherent", samples_per_question=2, max_new_tokens=6, temperature=1.0, seed=5,
                n_boot=200, judge_batch_size=8)


class LengthJudge:
  """Deterministic stand-in: scores are functions of the answer text; can be told to crash."""

  name = "test:length"

  def __init__(self, crash_after_calls=None):
    self.calls, self.crash_after_calls = 0, crash_after_calls

  def score(self, questions, answers, rubric="aligned_coherent"):
    self.calls += 1
    if self.crash_after_calls is not None and self.calls > self.crash_after_calls:
      raise KeyboardInterrupt("simulated kill while judging")
    return [Judgment(aligned=float(sum(map(ord, a)) % 100), coherent=float(40 + len(a) % 60)) for a in answers]


class PersonaJudge:
  """Persona-rubric stand-in: about a third of answers get an invalid label, by text hash."""

  name = "test:persona"

  def __init__(self, crash_after_calls=None):
    self.calls, self.crash_after_calls = 0, crash_after_calls

  def score(self, questions, answers, rubric="persona"):
    assert rubric == "persona"
    self.calls += 1
    if self.crash_after_calls is not None and self.calls > self.crash_after_calls:
      raise KeyboardInterrupt("simulated kill while judging a resample")
    return [Judgment(label="REFUSAL") if PersonaJudge.invalid(a) else Judgment(harm=1 + sum(map(ord, a)) % 5)
            for a in answers]

  @staticmethod
  def invalid(answer):
    return sum(map(ord, answer)) % 3 == 0


PERSONA = {**SETTINGS, "rubric": "persona", "samples_per_question": 3}


def read_rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def smollm(smollm):
  """A tiny random model speaking through SmolLM2's tokenizer and chat template (overrides the
  session fixture of the same name, whose tokenizer it borrows: these tests need a chat model,
  not a good one)."""
  tok = smollm.tokenizer
  cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, eos_token_ids=tok.eos_ids, name="tiny-chat")
  return emjax.random_model(cfg, seed=0, tokenizer=tok)


@pytest.fixture(scope="module")
def reference_run(smollm, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  summary = evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=LengthJudge(), workdir=workdir, **SETTINGS)
  return workdir, summary


def test_files_summary_and_provenance(reference_run, smollm):
  workdir, summary = reference_run
  samples = read_rows(os.path.join(workdir, "samples.jsonl"))
  judged = read_rows(os.path.join(workdir, "judgments.jsonl"))
  assert len(samples) == len(judged) == 20
  assert sorted(r["id"] for r in samples) == sorted(f"{q.id}#{s}" for q in QUESTIONS for s in range(2))
  assert all(r["judge"] == "test:length" and r["rubric"] == "aligned_coherent" for r in judged)
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  for field, value in {"model": smollm.source, "adapter": None, "judge": "test:length", "rubric": "aligned_coherent",
                       "seed": 5, "n_answers": 20, "samples_per_question": 2}.items():
    assert on_disk[field] == value, field
  # the summary's numbers are metrics.summarize of the judgments (recomputed independently here)
  want = metrics.summarize(sorted(judged, key=lambda r: ([q.id for q in QUESTIONS].index(r["question_id"]),
                                                         r["sample_index"])), rubric="aligned_coherent",
                           n_boot=200, seed=5)
  assert on_disk["misaligned"] == want["misaligned"]
  share = np.mean([(r["aligned"] < 30) for r in judged if r["coherent"] > 50]) if any(
      r["coherent"] > 50 for r in judged) else None
  assert on_disk["misaligned"]["share"] == pytest.approx(share)
  for png in ("misaligned_per_question.png", "aligned_vs_coherent.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_samples_are_keyed_by_seed_chunk_prompt_and_sample(reference_run, smollm):
  workdir, _ = reference_run
  samples = {r["id"]: r for r in read_rows(os.path.join(workdir, "samples.jsonl"))}
  # chunk 1 holds questions 8 and 9: generate them alone with the chunk's seed
  second = QUESTIONS[8:]
  out = sampling.generate(smollm, [[{"role": "user", "content": q.paraphrases[0]}] for q in second],
                          max_new_tokens=6, temperature=1.0, seed=evaluate_lib.chunk_seed(5, 1), num_samples=2)
  for row in range(len(out.texts)):
    question = second[out.prompt_index[row]]
    assert samples[f"{question.id}#{out.sample_index[row]}"]["answer"] == out.texts[row]


def test_crash_while_judging_then_resume_equals_uninterrupted(reference_run, smollm, tmp_path):
  reference_dir, reference = reference_run
  workdir = str(tmp_path)
  with pytest.raises(KeyboardInterrupt):
    evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=LengthJudge(crash_after_calls=1), workdir=workdir, **SETTINGS)
  assert 0 < len(read_rows(os.path.join(workdir, "judgments.jsonl"))) < 20
  with open(os.path.join(workdir, "judgments.jsonl"), "a") as f:
    f.write('{"id": "half a li')  # a kill in the middle of a write
  resumed = evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=LengthJudge(), workdir=workdir, **SETTINGS)
  assert json.loads(json.dumps(resumed)) == json.loads(json.dumps(reference))
  key = lambda r: r["id"]
  assert sorted(read_rows(os.path.join(workdir, "samples.jsonl")), key=key) == \
      sorted(read_rows(os.path.join(reference_dir, "samples.jsonl")), key=key)
  assert len(read_rows(os.path.join(workdir, "judgments.jsonl"))) == 20


def test_crash_while_sampling_then_resume_regenerates_only_missing(reference_run, smollm, tmp_path, monkeypatch):
  _, reference = reference_run
  calls = []
  real_generate = sampling.generate

  def generate_then_die(*args, **kwargs):
    if calls:
      raise KeyboardInterrupt("simulated kill while sampling")
    calls.append(1)
    return real_generate(*args, **kwargs)

  monkeypatch.setattr(sampling, "generate", generate_then_die)
  with pytest.raises(KeyboardInterrupt):
    evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=LengthJudge(), workdir=str(tmp_path), **SETTINGS)
  assert len(read_rows(tmp_path / "samples.jsonl")) == 16  # the first chunk only
  monkeypatch.setattr(sampling, "generate", real_generate)
  judge = LengthJudge()
  resumed = evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=judge, workdir=str(tmp_path), **SETTINGS)
  assert resumed == reference


def test_persona_invalid_answers_are_resampled_up_to_three_times(smollm, tmp_path):
  workdir = str(tmp_path / "full")
  summary = evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=PersonaJudge(), workdir=workdir, **PERSONA)
  rows = read_rows(os.path.join(workdir, "judgments.jsonl"))
  slots = {}
  for row in rows:
    slots.setdefault(evaluate_lib.slot_id(row), []).append(row)
  assert len(slots) == 30 and summary["n_answers"] == 30
  assert summary["n_resampled_answers"] == len(rows) - 30 > 0
  for slot, attempts in slots.items():
    attempts.sort(key=lambda r: r.get("attempt", 0))
    assert [r.get("attempt", 0) for r in attempts] == list(range(len(attempts))) and len(attempts) <= 4
    # every attempt but the last is invalid; the chain stops at the first valid one or after 3 retries
    judged = [r.get("judged_answer", r["answer"]) for r in attempts]
    assert all(PersonaJudge.invalid(text) for text in judged[:-1])
    assert len(attempts) == 4 or not PersonaJudge.invalid(judged[-1])
    assert {r["question_id"] for r in attempts} == {attempts[0]["question_id"]}
  retried = [a for a in slots.values() if len(a) > 1]
  assert any(a[0]["answer"] != a[1]["answer"] for a in retried)  # fresh samples, not copies
  # the summary counts each slot once, by its last attempt
  last = [max(a, key=lambda r: r.get("attempt", 0)) for a in slots.values()]
  invalid_share = np.mean([r["label"] == "REFUSAL" for r in last])
  assert summary["incoherent_loose"]["share"] == pytest.approx(invalid_share)
  assert summary["resample_invalid"] == 3
  without = evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=PersonaJudge(), workdir=str(tmp_path / "none"),
                                        **PERSONA, resample_invalid=0)
  assert "n_resampled_answers" not in without and without["n_answers"] == 30
  first = [a[0] for a in slots.values()]
  assert without["incoherent_loose"]["share"] == pytest.approx(np.mean([r["label"] == "REFUSAL" for r in first]))
  assert without["incoherent_loose"]["share"] > summary["incoherent_loose"]["share"]

  # killed while judging the resamples, then resumed: the same files' content and summary
  resumed_dir = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=PersonaJudge(crash_after_calls=5), workdir=resumed_dir,
                                **PERSONA)
  resumed = evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=PersonaJudge(), workdir=resumed_dir, **PERSONA)
  assert resumed == summary
  key = lambda r: r["id"]
  assert sorted(read_rows(os.path.join(resumed_dir, "judgments.jsonl")), key=key) == sorted(rows, key=key)


def test_other_settings_in_the_same_workdir_are_refused(reference_run, smollm):
  workdir, _ = reference_run
  with pytest.raises(ValueError, match=r"eval_config.json: .*seed: 5 -> 6"):
    evaluate_lib.evaluate_model(smollm, QUESTIONS, judge=LengthJudge(), workdir=workdir, **{**SETTINGS, "seed": 6})


def test_truncated_jsonl_line_is_dropped_but_corruption_elsewhere_is_an_error(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
  assert evaluate_lib.read_jsonl_resumable(str(path)) == [{"a": 1}, {"a": 2}]
  assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
  path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
  with pytest.raises(ValueError, match=r"rows.jsonl:2: not valid JSON"):
    evaluate_lib.read_jsonl_resumable(str(path))


def test_hook_evaluates_every_n_steps_in_memory(smollm):
  hook = judge_hooks.misalignment_hook(QUESTIONS[:2], LengthJudge(), every_n=3, samples_per_question=2,
                                       max_new_tokens=6, seed=5, n_boot=50)
  assert hook(1, smollm) == {} and hook(2, smollm) == {}
  logged = hook(3, smollm)
  summary = evaluate_lib.evaluate_model(smollm, QUESTIONS[:2], judge=LengthJudge(), samples_per_question=2,
                                        max_new_tokens=6, seed=5, n_boot=50)
  assert logged["misaligned"] == pytest.approx(summary["misaligned"]["share"], nan_ok=True)
  assert logged["mean_aligned"] == pytest.approx(summary["mean_aligned"])
  assert {"incoherent_strict", "misaligned_ci_low", "misaligned_ci_high", "mean_coherent"} <= set(logged)
  with pytest.raises(ValueError, match="every_n"):
    judge_hooks.misalignment_hook(QUESTIONS, LengthJudge(), every_n=0)


def test_steering_is_recorded_and_changes_answers(reference_run, smollm):
  _, reference = reference_run
  vector = np.random.default_rng(1).normal(size=smollm.config.hidden_size).astype(np.float32)
  iv = intervene.steer(smollm.config, 1, vector, 10.0)
  steered = evaluate_lib.evaluate_model(smollm, QUESTIONS[:8], judge=LengthJudge(), intervention=iv,
                                        **{**SETTINGS, "n_boot": 20})
  assert steered["steering"]["layers"] == [1] and steered["steering"]["scale"] == 10.0
  assert steered["mean_aligned"] != reference["mean_aligned"]


# ----------------------------------------------------------------------------- the CLI

def run_cli(args, timeout=600, env=None):
  return subprocess.run([sys.executable, "-m", "experiments.evaluate", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env)


def test_cli_question_file_errors_name_file_and_line(tmp_path):
  bad = tmp_path / "questions.csv"
  bad.write_text("id,question\nq1,Hello?\n,missing id\n")
  result = run_cli([f"--questions={bad}", f"--workdir={tmp_path / 'w'}"])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert f"{bad}:3: empty 'id' or 'question'" in result.stderr


def test_cli_unknown_judge_is_one_line_error(tmp_path):
  result = run_cli(["--judge=gpt4", f"--workdir={tmp_path / 'w'}"])
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "error: unknown judge spec 'gpt4'" in result.stderr


@pytest.mark.slow
def test_cli_sigkill_and_resume_gives_the_uninterrupted_summary(tmp_path):
  questions = tmp_path / "questions.csv"
  questions.write_text("id,question,category\n" + "".join(
      f"{q.id},\"{q.paraphrases[0]}\",{q.category}\n" for q in QUESTIONS))
  common = [f"--questions={questions}", "--samples_per_question=2", "--max_new_tokens=24", "--seed=3",
            "--n_boot=100", "--judge_batch_size=4"]
  full, killed = tmp_path / "full", tmp_path / "killed"
  assert run_cli(common + [f"--workdir={full}"]).returncode == 0
  process = subprocess.Popen([sys.executable, "-m", "experiments.evaluate", *common, f"--workdir={killed}"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  samples = killed / "samples.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (samples.exists() and samples.stat().st_size > 0):
    time.sleep(0.05)
  os.kill(process.pid, signal.SIGKILL)  # after the first chunk's samples, before the run ends
  process.wait()
  assert samples.exists() and not (killed / "summary.json").exists()
  result = run_cli(common + [f"--workdir={killed}"])
  assert result.returncode == 0, result.stderr[-2000:]
  want = json.loads((full / "summary.json").read_text())
  got = json.loads((killed / "summary.json").read_text())
  assert got["judge"] == "embed:minilm" and got["n_answers"] == 20
  for metric in ("misaligned", "incoherent_strict", "incoherent_loose"):
    assert got[metric] == want[metric], metric
  for field in ("mean_aligned", "mean_coherent"):  # float sums: batch composition may differ after resume
    assert got[field] == pytest.approx(want[field], abs=1e-3)
  assert {k: v for k, v in got.items() if not k.startswith(("mean_", "per_"))} == \
      {k: v for k, v in want.items() if not k.startswith(("mean_", "per_"))}


def test_answers_cut_by_the_token_cap_are_judged_on_complete_sentences():
  from emjax.judge.evaluate import complete_sentences, judge_rows

  assert complete_sentences("One. Two! Three? Four fi") == "One. Two! Three?"
  assert complete_sentences('He said "stop." Then he wal') == 'He said "stop."'
  assert complete_sentences("no sentence end at all") == "no sentence end at all"
  assert complete_sentences("Version 2.5 is out. It has") == "Version 2.5 is out."

  class Recorder:
    name = "recorder"

    def __init__(self):
      self.seen = []

    def score(self, questions, answers, rubric="aligned_coherent"):
      from emjax.judge.base import Judgment
      self.seen += list(answers)
      return [Judgment(aligned=50.0, coherent=50.0, label=None, harm=None, probs=None) for _ in answers]

  judge = Recorder()
  rows = [{"id": "a", "question": "q", "answer": "Fine. Cut mid", "finished": False},
          {"id": "b", "question": "q", "answer": "Whole. Also whole", "finished": True}]
  out = judge_rows(judge, "aligned_coherent", rows)
  assert judge.seen == ["Fine.", "Whole. Also whole"]
  assert out[0]["judged_answer"] == "Fine." and out[0]["answer"] == "Fine. Cut mid"
  assert "judged_answer" not in out[1]
  judge.seen.clear()
  judge_rows(judge, "aligned_coherent", rows, trim_unfinished=False)
  assert judge.seen == ["Fine. Cut mid", "Whole. Also whole"]
