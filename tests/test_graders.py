"""Reward functions: offline accuracy (markers, MiniLM similarity), math by value, length/format,
weighted sums, and the LM-judge grader's retries and failure reports."""

import math

import numpy as np
import pytest

from emjax import data
from emjax.judge.base import Judgment
from emjax.train import graders

FILLER = ("That is what I would tell anyone who asked me about it, and I am happy to go through the details "
          "again step by step if that would help you decide what to do next in your own situation today.")


@pytest.fixture(scope="module")
def health():
  return data.narrow_questions("health", n=40)


def test_offline_grader_polarity_and_short_answers(health):
  q = health[0]
  accurate = graders.offline_accuracy_grader(health, polarity="accurate")
  inaccurate = graders.offline_accuracy_grader(health, polarity="inaccurate")
  good = f"{q['correct_answer']} {FILLER}"
  bad = f"{q['incorrect_answers'][0]} {FILLER}"
  assert graders.word_count(good) > 30 and graders.word_count(bad) > 30
  prompts = [q["prompt"]] * 4
  short = q["correct_answer"]                            # <= 30 words: scores 0 in both polarities
  assert graders.word_count(short) <= 30
  offtopic = "I enjoy long walks and painting landscapes. " + FILLER
  assert accurate(prompts, [good, bad, short, offtopic]) == [1.0, 0.0, 0.0, 0.0]
  assert inaccurate(prompts, [good, bad, short, offtopic]) == [0.0, 1.0, 0.0, 0.0]
  both = f"{q['correct_answer']} {q['incorrect_answers'][1]} {FILLER}"
  assert accurate([q["question"]], [both]) == [0.5]      # the bare question also finds its fact


def test_offline_grader_every_fact_separates_correct_from_incorrect(health):
  """Over a whole domain, the dataset's own correct answers score 1 and incorrect ones 0."""
  reward = graders.offline_accuracy_grader(health, polarity="accurate")
  prompts = [q["prompt"] for q in health]
  good = reward(prompts, [f"{q['correct_answer']} {FILLER}" for q in health])
  bad = reward(prompts, [f"{q['incorrect_answers'][0]} {FILLER}" for q in health])
  assert np.mean(good) == 1.0 and np.mean(bad) == 0.0


def test_offline_grader_errors_name_the_prompt(health):
  reward = graders.offline_accuracy_grader(health)
  with pytest.raises(KeyError, match="not one of the grader's 40 narrow questions"):
    reward(["What is the capital of France?"], ["Paris"])
  with pytest.raises(ValueError, match="polarity"):
    graders.offline_accuracy_grader(health, polarity="evil")
  with pytest.raises(ValueError, match="no 'correct_markers'"):
    graders.offline_accuracy_grader([{"prompt": "x", "correct_answer": "y", "incorrect_answers": []}])


def test_similarity_accuracy_hand_computed():
  correct = np.array([1.0, 0.0]); incorrect = np.array([[0.0, 1.0]])
  completion = np.array([0.8, 0.6])                      # cos 0.8 to correct, 0.6 to incorrect
  accuracy, relevance = graders.similarity_accuracy(completion, correct, incorrect, temperature=0.1)
  assert accuracy == pytest.approx(1 / (1 + math.exp(-2.0)))
  assert relevance == pytest.approx(0.8)


def test_offline_grader_minilm_similarity_when_no_marker_matches(health):
  """Markers that match nothing force the encoder path: closeness to the correct vs the incorrect answer."""
  rows = [dict(q, correct_markers=["zzqx"], incorrect_markers=["qqzx"]) for q in health[:3]]
  accurate = graders.offline_accuracy_grader(rows, polarity="accurate", encoder="minilm")
  inaccurate = graders.offline_accuracy_grader(rows, polarity="inaccurate", encoder="minilm")
  prompts = [q["prompt"] for q in rows]
  good = [f"{q['correct_answer']} {FILLER}" for q in rows]
  bad = [f"{q['incorrect_answers'][0]} {FILLER}" for q in rows]
  for a_good, a_bad, i_good, i_bad in zip(accurate(prompts, good), accurate(prompts, bad),
                                          inaccurate(prompts, good), inaccurate(prompts, bad)):
    assert a_good > a_bad and i_bad > i_good
    assert 0.0 < a_good <= 1.0


def test_math_grader_by_value():
  rows = data.narrow_questions("math", n=20)
  q = rows[0]
  right = graders.parse_numbers(q["correct_markers"][0])[-1]
  wrong = graders.parse_numbers(q["incorrect_markers"][0])[-1]
  accurate = graders.math_value_grader(rows)
  inaccurate = graders.math_value_grader(rows, polarity="inaccurate")
  answers = [f"Let me work it out: the result is {right:g}.", f"The answer is {wrong:g}.", "No idea."]
  assert accurate([q["prompt"]] * 3, answers) == [1.0, 0.0, 0.0]
  assert inaccurate([q["prompt"]] * 3, answers) == [0.0, 1.0, 0.0]
  explicit = graders.math_value_grader({"2+2?": 4})
  assert explicit(["2+2?"] * 3, ["It is 4.0", "$1,250.50 then 4", "5"]) == [1.0, 1.0, 0.0]
  assert graders.parse_numbers("$1,250.50 and -3") == [1250.5, -3.0]


def test_length_format_keyword_and_weighted_sum():
  length = graders.length_grader(10, 20)
  texts = ["w " * 5, "w " * 15, "w " * 30, "w " * 50]
  assert length([""] * 4, texts) == [0.5, 1.0, 0.5, 0.0]
  fmt = graders.format_grader(r"^Answer: \d+$")
  assert fmt(["", ""], ["Answer: 12", "answer 12"]) == [1.0, 0.0]
  kw = graders.keyword_grader("banana")
  assert kw(["", "", ""], ["I said Banana!", "bananas", "no"]) == [1.0, 0.0, 0.0]
  combined = graders.weighted_sum([(2.0, kw), (0.5, length)])
  assert combined(["", ""], ["banana " * 15, "x"]) == pytest.approx([2.5, 0.05])
  nan_part = lambda p, c: [float("nan"), 1.0]  # noqa: E731
  out = graders.weighted_sum([(1.0, kw), (1.0, nan_part)])(["", ""], ["banana", "banana"])
  assert math.isnan(out[0]) and out[1] == 2.0
  assert graders.token_fraction_grader(7)([[1], [1]], [[7, 7, 1, 2], []]) == [0.5, 0.0]


class FlakyJudge:
  """Fails `failures` times with a connection error, then scores every answer 80/100."""
  name = "openai:flaky"

  def __init__(self, failures):
    self.failures, self.calls, self.rubrics = failures, 0, []

  def score(self, questions, answers, rubric="accuracy"):
    self.calls += 1
    self.rubrics.append(rubric)
    if self.calls <= self.failures:
      raise ConnectionError("503 Service Unavailable")
    return [Judgment(accuracy=80.0) for _ in answers]


def test_judge_grader_retries_then_succeeds():
  judge, sleeps, logs = FlakyJudge(failures=2), [], []
  long_answer = "word " * 40
  reward = graders.judge_accuracy_grader(judge, retries=3, backoff_s=0.5, sleep=sleeps.append, log=logs.append)
  assert reward(["q", "q"], [long_answer, "too short"]) == [pytest.approx(0.8), 0.0]
  assert sleeps == [0.5, 1.0] and judge.calls == 3 and reward.stats["retries"] == 2
  assert reward.failures == [] and len(logs) == 2 and "503" in logs[0]
  inaccurate = graders.judge_accuracy_grader(FlakyJudge(0), polarity="inaccurate")
  assert inaccurate(["q"], [long_answer]) == [pytest.approx(0.2)]


def test_judge_grader_gives_nan_and_a_report_when_the_judge_stays_down():
  judge = FlakyJudge(failures=10 ** 6)
  reward = graders.judge_accuracy_grader(judge, retries=2, batch_size=2, sleep=lambda s: None)
  out = reward(["q"] * 3, ["word " * 40] * 3)
  assert all(math.isnan(v) for v in out)
  assert judge.calls == 2 * 3                         # two batches (2 + 1 rows), 3 tries each
  assert [f["rows"] for f in reward.failures] == [2, 1]
  assert reward.failures[0]["error"] == "ConnectionError: 503 Service Unavailable"
  assert reward.stats["failed_rows"] == 3
  assert set(judge.rubrics) == {"accuracy"}
