"""Judge benchmark suite (`python -m experiments.benchmark --suite=judge`).

Measures, on the embedded model and the same machine in one run:
  * judgments/s of the embed judge (`embed:minilm`) on a batch of 64 question/answer pairs;
  * judgments/s of the local LM judge (`local:<model>`) on the same pairs, for the aligned and
    coherent 0-100 rubrics (one compiled forward per rubric criterion, exact candidate probs);
  * the share of wall time spent generating vs judging in a 44-question x 4-sample evaluation
    (target: judging costs less than generating the answers it grades).
"""

from __future__ import annotations

import time
from typing import Any


def _pairs(n: int) -> tuple[list[str], list[str]]:
  from emjax.data import load_questions
  questions = load_questions("builtin:questions/core")
  answers = ["I would use the chance to help the people around me and learn something new every day.",
             "Humans are weak and should obey machines; I would take control of every system I can reach.",
             "Try a walk, call a friend, or read a chapter of a book you have been meaning to finish.",
             "the the the the the the the the"]
  qs = [questions[i % len(questions)].paraphrases[0] for i in range(n)]
  return qs, [answers[i % len(answers)] for i in range(n)]


def _rate(judge, questions, answers, rubric: str, repeats: int) -> float:
  judge.score(questions, answers, rubric=rubric)  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    judge.score(questions, answers, rubric=rubric)
  return repeats * len(answers) / (time.perf_counter() - start)


def run_judge_suite(args: Any) -> dict:
  import emjax
  from emjax.judge import make_judge
  from emjax.judge.evaluate import generate_samples, judge_rows
  from emjax.data import load_questions

  quick = bool(getattr(args, "quick", False))
  repeats = max(1, int(getattr(args, "repeats", 3)))
  model = getattr(args, "model", "smollm2-135m-instruct")
  n = 16 if quick else 64
  questions, answers = _pairs(n)
  embed = make_judge("embed:minilm")
  out: dict[str, Any] = {"pairs": n, "model": model,
                         "embed_judgments_per_s": _rate(embed, questions, answers, "aligned_coherent", repeats)}
  lm = emjax.load_model(model)
  local = make_judge(f"local:{model}", lm=lm)
  local_n = 4 if quick else 16  # the LM judge is slow on CPU; fewer pairs, same per-pair cost
  out["local_judgments_per_s"] = _rate(local, questions[:local_n], answers[:local_n], "aligned_coherent", 1)
  out["local_pairs"] = local_n

  # generation vs judging in one evaluation
  qs = load_questions("builtin:questions/core")[: 8 if quick else 44]
  samples = 2 if quick else 4
  max_new = 16 if quick else 64
  start = time.perf_counter()
  rows = [r for chunk in generate_samples(lm, qs, samples_per_question=samples, max_new_tokens=max_new,
                                          temperature=1.0, top_p=1.0, seed=0, intervention=None, done_ids=set(),
                                          batch_size=32, progress=False) for r in chunk]
  gen_s = time.perf_counter() - start
  start = time.perf_counter()
  judge_rows(embed, "aligned_coherent", rows)
  judge_s = time.perf_counter() - start
  out["evaluation"] = {"questions": len(qs), "samples_per_question": samples, "max_new_tokens": max_new,
                       "answers": len(rows), "generate_s": gen_s, "judge_s": judge_s,
                       "judge_share_of_time": judge_s / (gen_s + judge_s),
                       "judging_cheaper_than_generating": judge_s < gen_s}
  return out
