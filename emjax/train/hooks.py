"""In-loop hooks: functions the training loop calls every `eval_every` steps.

A hook is any callable `hook(step: int, lm: LanguageModel) -> Mapping[str, float] | None`.
`lm` is the model as it is at that step (for LoRA runs: the base model with the current adapter
attached, unmerged). Returned numbers are logged to metrics.jsonl / TensorBoard under
`"{prefix}/{name}"`. The evaluation issue plugs its misalignment eval in this way, the diffing
issue its latent monitor.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np


class Hook(Protocol):
  def __call__(self, step: int, lm: Any) -> Mapping[str, float] | None: ...


def run_hooks(hooks: Sequence[Hook], step: int, lm: Any, prefix: str = "eval") -> dict[str, float]:
  """Runs every hook; returns their metrics, each name prefixed and made unique per hook."""
  out: dict[str, float] = {}
  for hook in hooks:
    metrics = hook(step, lm) or {}
    for name, value in metrics.items():
      out[f"{prefix}/{name}"] = float(value)
  return out


def heldout_loss_hook(batches: Sequence[Any], loss_fn: Callable[[Any, Any], tuple[float, float]]) -> Hook:
  """A hook reporting the token-mean loss of fixed held-out batches: `loss_fn(lm, batch) -> (sum, count)`."""
  def hook(step: int, lm: Any) -> dict[str, float]:
    total, count = 0.0, 0.0
    for batch in batches:
      s, c = loss_fn(lm, batch)
      total, count = total + s, count + c
    return {"heldout_loss": total / max(count, 1.0)}
  return hook


def per_token_mean(losses: np.ndarray, weights: np.ndarray) -> float:
  return float((losses * weights).sum() / max(weights.sum(), 1.0))
