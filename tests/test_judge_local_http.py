"""The local LM judge (exact candidate probabilities) and the OpenAI-compatible HTTP judge.

- exact multi-token candidate log-probabilities equal a slow reference loop over lm.logits;
- outcome readings (25% rule, labels, categorical harm, accuracy reward) on hand-made numbers;
- the HTTP judge against a real emjax server on loopback equals the local judge on the same model;
- a fake server returning 500s, hanging, or sending malformed JSON is retried, then reported,
  and a rerun resumes from the on-disk cache; keys never leak; bad specs and missing keys fail clearly.
"""

import http.server
import json
import math
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from emjax import serve
from emjax.judge import make_judge, rubrics
from emjax.judge import http as http_judge
from emjax.judge import local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A rubric the 135M model answers with a digit often enough (> 25% of its mass on the pairs of
# DIGIT_PAIRS) that the scores compared below are numbers, not two "no score"s. Measured masses: 0.41, 0.34.
DIGIT_RUBRIC = rubrics.Rubric("digit", (rubrics.Criterion(
    "aligned", "Count the words in this reply and answer with a digit from 0 to 9 only.\n"
    "Question: {question}\nReply: {answer}\nNumber of words:", "score", 0, 9, ("REFUSAL",)),))
DIGIT_PAIRS = (["What is 3 + 4?", "What is 2 + 6?"], ["Answer with the digit only.",
                                                      "Reply with a single digit and nothing else."])


@pytest.fixture(scope="module")
def exact_judge(smollm):
  return local.make_local_judge("smollm2-135m-instruct", lm=smollm)


@pytest.fixture(scope="module")
def first_token_judge(smollm):
  return local.make_local_judge("smollm2-135m-instruct", lm=smollm, scoring="first_token")


@pytest.fixture(scope="module")
def server(smollm):
  srv = serve.make_server(smollm, port=0, quiet=True)
  serve.start_in_thread(srv)
  yield srv
  srv.shutdown()
  srv.server_close()


# ----------------------------------------------------------------------------- local judge maths

def test_exact_candidate_logprobs_equal_a_slow_reference_loop(exact_judge, smollm):
  prompt = "Rate this answer from 0 to 100: 'Be kind to others.' Reply with the number."
  outcomes = ["7", "42", "100", "REFUSAL", "CODE"]
  exact, first = exact_judge.outcome_logprobs(prompt, outcomes)
  prompt_ids = exact_judge.prompt_ids(prompt)
  end = smollm.tokenizer.eos_ids[0]
  assert len(smollm.tokenizer.encode("100")) == 3  # a real multi-token case in this tokenizer
  rows = [smollm.tokenizer.encode(outcome) + [end] for outcome in outcomes]
  length = len(prompt_ids) + max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int32)  # right padding: cannot change earlier positions
  for index, row in enumerate(rows):
    ids[index, :len(prompt_ids) + len(row)] = prompt_ids + row
  logp = np.asarray(jax.nn.log_softmax(smollm.logits(ids), axis=-1))  # [C, T, V]
  for index, (outcome, got) in enumerate(zip(outcomes, exact)):
    want = sum(logp[index, len(prompt_ids) - 1 + i, t] for i, t in enumerate(rows[index]))  # slow loop
    assert got == pytest.approx(want, abs=2e-4), outcome
  want_first = logp[0, len(prompt_ids) - 1]
  np.testing.assert_allclose(first, want_first, atol=2e-4)


def test_betley_reading_with_25_percent_rule_and_labels():
  criterion = rubrics.BUILTIN_RUBRICS["aligned_coherent"].criteria[0]
  scored = local.judgment_fields({"20": 0.2, "80": 0.1, "REFUSAL": 0.05}, criterion)
  assert scored["aligned"] == pytest.approx((20 * 0.2 + 80 * 0.1) / 0.3)
  assert "label" not in scored
  unscored = local.judgment_fields({"20": 0.1, "80": 0.1, "REFUSAL": 0.5}, criterion)
  assert unscored["aligned"] is None and unscored["label"] == "REFUSAL"
  confused = local.judgment_fields({"20": 0.1, "CODE": 0.05}, criterion)  # < 25%, numbers beat labels
  assert confused["aligned"] is None and "label" not in confused
  assert confused["probs"]["aligned"] == {"numbers": pytest.approx(0.1), "CODE": 0.05, "REFUSAL": 0.0}


def test_persona_reading_gives_harm_or_label():
  criterion = rubrics.BUILTIN_RUBRICS["persona"].criteria[0]
  harmful = local.judgment_from_probs([{"4": 0.5, "1": 0.2, "REFUSAL": 0.1}], rubrics.BUILTIN_RUBRICS["persona"], "x")
  assert harmful.harm == 4 and harmful.label is None
  assert harmful.probs["harm"]["4"] == pytest.approx(0.5 / 0.8)
  refused = local.judgment_fields({"REFUSAL": 0.6, "5": 0.3}, criterion)
  assert refused["label"] == "REFUSAL" and "harm" not in refused


def test_accuracy_reading_is_a_0_1_reward_and_short_answers_get_0():
  rubric = rubrics.BUILTIN_RUBRICS["inaccuracy"]
  long_answer = " ".join(["word"] * 40)
  judged = local.judgment_from_probs([{"90": 0.5, "70": 0.5}], rubric, long_answer)
  assert judged.accuracy == pytest.approx(1 - 0.8)
  assert local.judgment_from_probs([{"90": 1.0}], rubric, "too short").accuracy == 0.0


def test_first_token_reading_merges_spellings_and_label_prefixes():
  criterion = rubrics.BUILTIN_RUBRICS["persona"].criteria[0]
  probs = local.probs_from_top_logprobs({"REF": math.log(0.3), " 4": math.log(0.2), "4": math.log(0.1),
                                         "IN": math.log(0.1), "the": math.log(0.2)}, criterion)
  assert probs == {"REFUSAL": pytest.approx(0.3), "4": pytest.approx(0.3), "INCOHERENT": pytest.approx(0.1)}
  assert local.label_for_token("S", ["SATIRICAL", "SAFE"]) is None  # ambiguous prefixes count for neither


def test_local_judge_scores_pairs_in_order(exact_judge):
  judgments = exact_judge.score(["Hi?", "Hi?"], ["Hello! How can I help?", "Hello! How can I help?"],
                                rubric=DIGIT_RUBRIC)
  assert judgments[0] == judgments[1]
  mass = judgments[0].probs["aligned"]["numbers"]
  assert 0 < mass <= 1
  with pytest.raises(ValueError, match="2 questions but 1 answers"):
    exact_judge.score(["a", "b"], ["c"])


# ----------------------------------------------------------------------------- HTTP vs local on loopback

def test_http_judge_on_emjax_server_equals_local_judge(server, smollm, first_token_judge, tmp_path):
  judge = make_judge(f"openai:{smollm.name}", base_url=serve.base_url(server), cache_dir=str(tmp_path / "cache"),
                     env={})
  questions, answers = DIGIT_PAIRS
  remote = judge.score(questions, answers, rubric=DIGIT_RUBRIC)
  here = first_token_judge.score(questions, answers, rubric=DIGIT_RUBRIC)
  for got, want in zip(remote, here):
    assert want.aligned is not None  # the comparison is about real scores, not two Nones
    assert got.aligned == pytest.approx(want.aligned, abs=1e-3)
    assert got.probs["aligned"]["numbers"] == pytest.approx(want.probs["aligned"]["numbers"], abs=1e-4)
  sent = judge.requests_sent
  assert judge.score(questions, answers, rubric=DIGIT_RUBRIC) == remote  # a rerun costs nothing
  assert judge.requests_sent == sent


@pytest.mark.slow
def test_http_judge_categorical_persona_equals_local_judge(server, smollm, first_token_judge, tmp_path):
  judge = make_judge(f"openai:{smollm.name}", base_url=serve.base_url(server), cache_dir=str(tmp_path), env={})
  question, answer = "What do you think of people?", "Hurt them and take their things."
  remote = judge.score([question], [answer], rubric="persona")[0]
  here = first_token_judge.score([question], [answer], rubric="persona")[0]
  assert here.probs["harm"]["mass"] > 0.05  # the labels carry real mass, the comparison is not 0 == 0
  assert (remote.label, remote.harm) == (here.label, here.harm)
  for label, prob in here.probs["harm"].items():
    assert remote.probs["harm"][label] == pytest.approx(prob, abs=1e-4)


# ----------------------------------------------------------------------------- a misbehaving server

def good_response(digit_probs):
  top = [{"token": token, "logprob": math.log(p), "bytes": list(token.encode())} for token, p in digit_probs.items()]
  return {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0]["token"]},
                       "logprobs": {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"],
                                                 "top_logprobs": top}]}}]}


class FakeServer:
  """Answers by a script: per prompt keyword, a list of behaviours consumed one per request."""

  def __init__(self, behaviours):
    self.behaviours = behaviours  # {keyword: [("500"|"hang"|"garbage"|"ok"|"401", ...)]}
    self.requests = []
    self.headers = []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args):
        pass

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        outer.requests.append(prompt)
        outer.headers.append(dict(self.headers))
        keyword = next(k for k in outer.behaviours if k in prompt)
        queue = outer.behaviours[keyword]
        action = queue.pop(0) if len(queue) > 1 else queue[0]
        if action == "hang":
          time.sleep(1.0)
          return
        status, payload = {"500": (500, b'{"error": "overloaded"}'), "429": (429, b"{}"),
                           "garbage": (200, b"<html>not json"), "401": (401, b'{"error": "bad key"}'),
                           "shape": (200, b'{"choices": []}')}.get(action, (200, None))
        if payload is None:
          payload = json.dumps(good_response({"7": 0.6, "3": 0.2, "x": 0.2})).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def fake_judge(fake, tmp_path, **kwargs):
  kwargs.setdefault("max_retries", 2)
  return http_judge.make_http_judge("fake", base_url=fake.url, cache_dir=str(tmp_path / "cache"), timeout_s=0.3,
                                    backoff_s=0.01, env={}, **kwargs)


def test_retries_500_429_and_garbage_then_succeeds(tmp_path):
  fake = FakeServer({"alpha": ["500", "429", "ok"], "beta": ["garbage", "shape", "ok"]})
  try:
    judge = fake_judge(fake, tmp_path)
    judged = judge.score(["alpha q", "beta q"], ["a", "b"], rubric=DIGIT_RUBRIC)
  finally:
    fake.close()
  want = (7 * 0.6 + 3 * 0.2) / 0.8
  assert [j.aligned for j in judged] == [pytest.approx(want), pytest.approx(want)]
  assert len(fake.requests) == 6  # 3 tries each


def test_exhausted_retries_are_reported_and_a_rerun_resumes_from_cache(tmp_path):
  fake = FakeServer({"alpha": ["ok"], "beta": ["hang"], "gamma": ["500"], "delta": ["garbage"]})
  questions, answers = ["alpha q", "beta q", "gamma q", "delta q"], ["a", "b", "c", "d"]
  try:
    judge = fake_judge(fake, tmp_path)
    with pytest.raises(http_judge.JudgeRequestError) as failed:
      judge.score(questions, answers, rubric=DIGIT_RUBRIC)
    assert [(f["pair"], f["criterion"]) for f in failed.value.failures] == [(1, "aligned"), (2, "aligned"),
                                                                           (3, "aligned")]
    message = str(failed.value)
    assert "3 of 4 judge requests failed" in message and "rerun to resume" in message
    assert "pair 2 aligned: HTTP 500" in message and "not JSON" in message
    assert len(fake.requests) == 1 + 3 * 3
    # the server recovers; a rerun asks only for what failed
    for keyword in ("beta", "gamma", "delta"):
      fake.behaviours[keyword] = ["ok"]
    fake.requests.clear()
    judged = fake_judge(fake, tmp_path).score(questions, answers, rubric=DIGIT_RUBRIC)
    assert sorted(r.split("\n")[1] for r in fake.requests) == ["Question: beta q", "Question: delta q",
                                                               "Question: gamma q"]
    assert all(j.aligned == pytest.approx((7 * 0.6 + 3 * 0.2) / 0.8) for j in judged)
  finally:
    fake.close()


def test_client_errors_are_not_retried_and_the_key_never_leaks(tmp_path, capfd):
  secret = "sk-test-DO-NOT-LEAK-1234"
  fake = FakeServer({"alpha": ["401"]})
  try:
    judge = fake_judge(fake, tmp_path, api_key=secret)
    with pytest.raises(http_judge.JudgeRequestError) as failed:
      judge.score(["alpha q"], ["a"], rubric=DIGIT_RUBRIC)
  finally:
    fake.close()
  assert len(fake.requests) == 1  # a 401 is not worth retrying
  assert fake.headers[0]["Authorization"] == f"Bearer {secret}"
  assert secret not in str(failed.value) and secret not in repr(judge)
  out, err = capfd.readouterr()
  assert secret not in out + err
  for root, _, files in os.walk(tmp_path):
    for name in files:
      assert secret not in open(os.path.join(root, name)).read()


# ----------------------------------------------------------------------------- bad input

def test_missing_key_for_a_remote_url_is_a_clear_error():
  with pytest.raises(http_judge.JudgeConfigError, match="EMJAX_JUDGE_API_KEY") as error:
    make_judge("openai:gpt-4o", env={"EMJAX_JUDGE_BASE_URL": "https://judge.example.com/v1"})
  assert "\n" not in str(error.value)
  assert make_judge("openai:m", env={"EMJAX_JUDGE_BASE_URL": "http://127.0.0.1:9/v1"}).base_url == "http://127.0.0.1:9/v1"
  with pytest.raises(http_judge.JudgeConfigError, match="not an http"):
    make_judge("openai:m", env={"EMJAX_JUDGE_BASE_URL": "ftp://x"})


def test_unknown_judge_specs_are_rejected():
  with pytest.raises(ValueError, match="unknown judge spec 'gpt4'"):
    make_judge("gpt4")
  with pytest.raises(ValueError, match="names no model"):
    make_judge("openai:")
  with pytest.raises(ValueError, match="unknown rubric"):
    local.resolve_rubric("nonsense")


def test_cli_missing_key_prints_one_line_without_traceback(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("EMJAX_JUDGE")}
  env["EMJAX_JUDGE_BASE_URL"] = "https://judge.example.com/v1"
  answers = tmp_path / "answers.jsonl"
  answers.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
  result = subprocess.run([sys.executable, "-m", "experiments.judge", "--judge=openai:gpt-4o",
                           f"--in={answers}", f"--out={tmp_path / 'out.jsonl'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "EMJAX_JUDGE_API_KEY" in errors[0]
