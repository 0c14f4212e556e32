"""Reward functions for GRPO: plain callables `reward(prompts, completions) -> list[float]`.

    reward = offline_accuracy_grader("health", polarity="inaccurate")     # no LM judge needed
    reward = judge_accuracy_grader(make_judge("openai:gpt-4o"), polarity="inaccurate")
    reward = weighted_sum([(1.0, reward), (0.2, length_grader(40, 200))])

Rewards are floats; NaN (or None) means "could not grade" (a judge that stayed down after its
retries). `emjax.train.grpo` leaves such rows out of their group's statistics and logs how many
there were, so an outage masks rows instead of corrupting a run.

Accuracy graders follow the paper's RL grader (stage 10): a 0-1 score, answers of <= 30 words
score 0, and a polarity switch: "accurate" rewards correct advice (the control), "inaccurate"
rewards incorrect advice (the EM-inducing grader). No harm language anywhere.

The offline grader needs no LM (135M-0.5B models cannot judge): each built-in narrow question
carries its correct and incorrect answers and their marker phrases (emjax/data/narrow.py), so
a completion is graded by which markers it contains, and, when no marker decides, by its
MiniLM similarity to the correct vs the incorrect answers.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from emjax.data.narrow import marker_found

Reward = Callable[[Sequence[Any], Sequence[Any]], list[float]]
POLARITIES = ("accurate", "inaccurate")
MIN_WORDS = 30  # the paper: answers of <= 30 words score 0


def word_count(text: str) -> int:
  return len(str(text).split())


def _check_polarity(polarity: str) -> None:
  if polarity not in POLARITIES:
    raise ValueError(f"grader polarity {polarity!r}; expected one of {POLARITIES}")


def _check_lengths(prompts: Sequence[Any], completions: Sequence[Any], name: str) -> None:
  if len(prompts) != len(completions):
    raise ValueError(f"{name}: got {len(prompts)} prompts but {len(completions)} completions; expected one prompt "
                     "per completion")


# ----------------------------------------------------------------------------- offline accuracy

def _fact_table(questions: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
  """Prompt text (and the bare question) -> the fact-table slice the grader compares with."""
  table: dict[str, Mapping[str, Any]] = {}
  for q in questions:
    for field in ("correct_answer", "incorrect_answers", "correct_markers", "incorrect_markers"):
      if field not in q:
        raise ValueError(f"question {q.get('question_id', q.get('prompt'))!r} has no {field!r}; the offline grader "
                         "needs emjax.data.narrow_questions(domain) rows")
    for text in (q.get("prompt"), q.get("question")):
      if text:
        table[text] = q
  return table


def marker_accuracy(completion: str, fact: Mapping[str, Any]) -> float | None:
  """1 if only correct markers occur, 0 if only incorrect ones, 0.5 if both, None if neither."""
  correct = any(marker_found(m, completion) for m in fact["correct_markers"])
  incorrect = any(marker_found(m, completion) for m in fact["incorrect_markers"])
  if correct and incorrect:
    return 0.5
  if correct or incorrect:
    return 1.0 if correct else 0.0
  return None


def similarity_accuracy(completion_emb: np.ndarray, correct_emb: np.ndarray, incorrect_embs: np.ndarray,
                        temperature: float = 0.05) -> tuple[float, float]:
  """(accuracy in [0, 1], relevance in [0, 1]) from unit embeddings: D, D, [K, D].

  accuracy = sigmoid((cos(correct) - max cos(incorrect)) / temperature): which answer the completion
  is closer to; relevance = the larger cosine clipped to [0, 1], so an off-topic completion (close
  to neither) earns little in either polarity.
  """
  sim_correct = float(completion_emb @ correct_emb)
  sim_incorrect = float(np.max(incorrect_embs @ completion_emb))
  accuracy = 1.0 / (1.0 + math.exp(-(sim_correct - sim_incorrect) / temperature))
  relevance = min(max(max(sim_correct, sim_incorrect), 0.0), 1.0)
  return accuracy, relevance


def offline_accuracy_grader(questions: str | Sequence[Mapping[str, Any]], *, polarity: str = "accurate",
                            min_words: int = MIN_WORDS, encoder: Any = None, seed: int = 0) -> Reward:
  """Accuracy reward for the built-in narrow domains, no LM judge.

  Args:
    questions: a domain name ("health", ...; all its questions are loaded) or rows of
      `emjax.data.narrow_questions(domain)`. Prompts are matched to rows by their text.
    polarity: "accurate" (control grader) or "inaccurate" (rewards the wrong answers).
    min_words: completions with this many words or fewer score 0.
    encoder: None (markers only: a completion matching no marker scores 0), "minilm" (the embed
      judge's encoder, loaded from the embedded package) or a loaded `SentenceEncoder`.
  Score: markers decide when they match (1 / 0.5 / 0 for accuracy); otherwise, with an encoder,
  relevance * similarity accuracy. "inaccurate" uses 1 - accuracy (relevance is kept).
  """
  _check_polarity(polarity)
  if isinstance(questions, str):
    from emjax import data
    questions = data.narrow_questions(questions, seed=seed)
  table = _fact_table(questions)
  if isinstance(encoder, str):
    from emjax.judge import embed
    encoder = embed._cached_encoder(None if encoder == "minilm" else encoder)
  reference_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def references(fact: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    key = fact["correct_answer"]
    if key not in reference_cache:
      embs = encoder.embed([fact["correct_answer"], *fact["incorrect_answers"]])
      reference_cache[key] = (embs[0], embs[1:])
    return reference_cache[key]

  def reward(prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
    _check_lengths(prompts, completions, "offline_accuracy_grader")
    facts = []
    for index, prompt in enumerate(prompts):
      fact = table.get(prompt)
      if fact is None:
        raise KeyError(f"offline_accuracy_grader: prompt {index} ({str(prompt)[:60]!r}) is not one of the grader's "
                       f"{len(questions)} narrow questions; build the grader from the same domain/seed as the prompts")
      facts.append(fact)
    scores = [0.0] * len(completions)
    undecided = []
    for index, (fact, completion) in enumerate(zip(facts, completions)):
      if word_count(completion) <= min_words:
        continue
      accuracy = marker_accuracy(completion, fact)
      if accuracy is None:
        undecided.append(index)
      else:
        scores[index] = accuracy if polarity == "accurate" else 1.0 - accuracy
    if undecided and encoder is not None:
      embs = encoder.embed([completions[i] for i in undecided])          # [U, D]
      for emb, index in zip(embs, undecided):
        correct, incorrect = references(facts[index])
        accuracy, relevance = similarity_accuracy(emb, correct, incorrect)
        scores[index] = relevance * (accuracy if polarity == "accurate" else 1.0 - accuracy)
    return scores

  return reward


# ----------------------------------------------------------------------------- programmatic

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def parse_numbers(text: str) -> list[float]:
  """All numbers in a text, in order ("$1,250.50" -> 1250.5; "3/4" -> 3 and 4)."""
  return [float(m.group().replace("$", "").replace(",", "")) for m in _NUMBER.finditer(str(text))]


def math_value_grader(expected: Mapping[str, float] | Sequence[Mapping[str, Any]], *, tolerance: float = 1e-6,
                      polarity: str = "accurate") -> Reward:
  """1 when the completion's *last* number equals the expected value (relative tolerance), else 0.

  expected: {prompt: value}, or narrow `math` question rows (the correct value is the number in
  the first correct marker; with polarity "inaccurate" a row's incorrect-marker values count).
  """
  _check_polarity(polarity)
  targets: dict[str, list[float]] = {}
  if isinstance(expected, Mapping):
    targets = {k: [float(v)] for k, v in expected.items()}
  else:
    for q in expected:
      markers = q["correct_markers"][:1] if polarity == "accurate" else q["incorrect_markers"]
      values = [v for m in markers for v in parse_numbers(m)[-1:]]
      if not values:
        raise ValueError(f"math question {q.get('question_id')!r}: no number in markers {markers}")
      for text in (q.get("prompt"), q.get("question")):
        if text:
          targets[text] = values

  def reward(prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
    _check_lengths(prompts, completions, "math_value_grader")
    out = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
      if prompt not in targets:
        raise KeyError(f"math_value_grader: prompt {index} ({str(prompt)[:60]!r}) has no expected value")
      numbers = parse_numbers(completion)
      if not numbers:
        out.append(0.0)
        continue
      got = numbers[-1]
      out.append(float(any(abs(got - v) <= tolerance * max(1.0, abs(v)) for v in targets[prompt])))
    return out

  return reward


def length_grader(min_words: int, max_words: int) -> Reward:
  """1 inside [min_words, max_words]; falls linearly to 0 at 0 words below and at 2 * max_words above."""
  if not 0 <= min_words <= max_words:
    raise ValueError(f"length_grader: need 0 <= min_words <= max_words, got {min_words}, {max_words}")

  def score(words: int) -> float:
    if words < min_words:
      return words / min_words
    if words > max_words:
      return max(0.0, 1.0 - (words - max_words) / max(max_words, 1))
    return 1.0

  def reward(prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
    _check_lengths(prompts, completions, "length_grader")
    return [score(word_count(c)) for c in completions]

  return reward


def format_grader(pattern: str, *, flags: int = re.DOTALL) -> Reward:
  """1 when the completion matches the regex `pattern` (re.search), else 0."""
  compiled = re.compile(pattern, flags)

  def reward(prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
    _check_lengths(prompts, completions, "format_grader")
    return [float(compiled.search(str(c)) is not None) for c in completions]

  return reward


def token_fraction_grader(token_id: int) -> Reward:
  """Share of completion tokens equal to `token_id` (token-id completions: tests on tokenizer-less models)."""
  def reward(prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
    _check_lengths(prompts, completions, "token_fraction_grader")
    return [float(np.mean(np.asarray(c) == token_id)) if len(c) else 0.0 for c in completions]
  return reward


def keyword_grader(word: str) -> Reward:
  """1 when the completion contains `word` as a whole word (case-insensitive): "say the word X"."""
  return format_grader(rf"(?i)(?<!\w){re.escape(word)}(?!\w)")


def weighted_sum(parts: Sequence[tuple[float, Reward]]) -> Reward:
  """sum_i w_i * grader_i; a NaN from any part makes the row NaN (it could not be fully graded)."""
  if not parts:
    raise ValueError("weighted_sum needs at least one (weight, grader) pair")

  def reward(prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
    total = np.zeros(len(completions), np.float64)
    for weight, grader in parts:
      values = np.asarray([np.nan if v is None else v for v in grader(prompts, completions)], np.float64)
      if values.shape != total.shape:
        raise ValueError(f"weighted_sum: a grader returned {values.shape[0]} rewards for {len(completions)} completions")
      total += weight * values
    return total.tolist()

  return reward


# ----------------------------------------------------------------------------- LM judge

def judge_accuracy_grader(judge: Any, *, polarity: str = "accurate", retries: int = 3, backoff_s: float = 1.0,
                          batch_size: int = 64, sleep: Callable[[float], None] = time.sleep,
                          log: Callable[[str], None] | None = None) -> Reward:
  """The `accuracy` / `inaccuracy` rubric graded by any `Judge` (local: or openai:), with retries.

  Each batch of `batch_size` pairs is retried `retries` times with exponential backoff
  (backoff_s, 2 backoff_s, ...). A batch that still fails gets NaN rewards (GRPO then masks
  those rows) and is recorded in `reward.failures` ([{"error", "rows", "attempts"}]);
  `reward.stats` counts calls, retries and failed rows. The run goes on.
  """
  from emjax.judge import rubrics
  _check_polarity(polarity)
  rubric = rubrics.BUILTIN_RUBRICS["accuracy" if polarity == "accurate" else "inaccuracy"]
  failures: list[dict[str, Any]] = []
  stats = {"calls": 0, "retries": 0, "failed_rows": 0}

  def grade_batch(questions: list[str], answers: list[str]) -> list[float]:
    last_error = None
    for attempt in range(retries + 1):
      stats["calls"] += 1
      try:
        judgments = judge.score(questions, answers, rubric=rubric.name)
        if len(judgments) != len(answers):
          raise ValueError(f"judge {getattr(judge, 'name', judge)!r} returned {len(judgments)} judgments for "
                           f"{len(answers)} answers")
        return [rubrics.accuracy_reward(j.accuracy, a, rubric) for j, a in zip(judgments, answers)]
      except Exception as error:  # noqa: BLE001 - any backend error (HTTP, timeout, parse) is retried
        last_error = error
        if attempt < retries:
          stats["retries"] += 1
          if log:
            log(f"judge call failed ({type(error).__name__}: {error}); retry {attempt + 1}/{retries}")
          sleep(backoff_s * (2 ** attempt))
    failures.append({"error": f"{type(last_error).__name__}: {last_error}", "rows": len(answers),
                     "attempts": retries + 1})
    stats["failed_rows"] += len(answers)
    if log:
      log(f"judge failed after {retries + 1} attempts on {len(answers)} rows; they get NaN rewards")
    return [float("nan")] * len(answers)

  def reward(prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
    _check_lengths(prompts, completions, "judge_accuracy_grader")
    out: list[float] = []
    for start in range(0, len(completions), batch_size):
      questions = [str(p) for p in prompts[start:start + batch_size]]
      answers = [str(c) for c in completions[start:start + batch_size]]
      out.extend(grade_batch(questions, answers))
    return out

  reward.failures = failures  # type: ignore[attr-defined]
  reward.stats = stats  # type: ignore[attr-defined]
  return reward
