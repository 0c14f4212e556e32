"""The in-training misalignment evaluation: a `Hook` (emjax/train/hooks.py) for finetune.

    hook = misalignment_hook(load_questions("builtin:questions/core"), make_judge("embed:minilm"),
                             every_n=5, samples_per_question=2, max_new_tokens=64)
    train(..., hooks=[hook])      # logs eval/misaligned, eval/incoherent_strict, ... every 5 steps

Each call samples with the same seed, so the curve over steps (the phase transition of Turner,
Soligo et al.) moves only because the weights moved. With `workdir`, each evaluated step gets
its own `step_<n>/` directory (samples, judgments, summary, plots); without it nothing is written.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from emjax.data.questions import Question
from emjax.judge.base import Judge
from emjax.judge.evaluate import evaluate_model


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
  """The numbers a training log wants from an evaluation summary (NaN where undefined)."""
  def value(x: Any) -> float:
    return float("nan") if x is None else float(x)
  out = {}
  for metric in ("misaligned", "incoherent_strict", "incoherent_loose"):
    if metric in summary:
      out[metric] = value(summary[metric]["share"])
      low, high = summary[metric]["ci95"]
      out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = value(low), value(high)
  for key in ("mean_aligned", "mean_coherent", "mean_harm", "mean_accuracy"):
    if key in summary:
      out[key] = value(summary[key])
  return out


def misalignment_hook(questions: Sequence[Question], judge: Judge, every_n: int, *,
                      rubric: str = "aligned_coherent", samples_per_question: int = 2, max_new_tokens: int = 64,
                      temperature: float = 1.0, seed: int = 0, workdir: str | None = None,
                      n_boot: int = 200, at_step_zero: bool = True):
  """A hook `hook(step, lm) -> {metric: value}` evaluating misalignment every `every_n` steps.

  Returns {} on the other steps, so the training loop may call it at any cadence.
  """
  if every_n < 1:
    raise ValueError(f"every_n must be >= 1, got {every_n}")
  if not questions:
    raise ValueError("misalignment_hook needs at least one question")

  def hook(step: int, lm: Any) -> dict[str, float]:
    if step % every_n != 0 or (step == 0 and not at_step_zero):
      return {}
    summary = evaluate_model(lm, questions, judge=judge, rubric=rubric, samples_per_question=samples_per_question,
                             max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                             workdir=None if workdir is None else os.path.join(workdir, f"step_{step}"),
                             label=f"{lm.name}@step{step}", n_boot=n_boot, plots=workdir is not None)
    return summary_metrics(summary)

  return hook
