"""Training monitor: the persona-latent probe as an SFT hook.

Every `every`-th call (the SFT loop calls hooks every `eval_every` steps), the hook runs the
model being trained on a fixed probe set (a few chat records; their assistant tokens), reads
the chosen latents with the SAE, and returns `latent/mean` (summed over the chosen latents,
averaged over assistant tokens), one `latent/<id>` per latent, and `latent/delta` against the
value at the first call (the model before any update, when the hook runs at step 0/1).

With `stop_above` set, a probe value above it raises `LatentThresholdExceeded`: the SFT loop
(`emjax.train.sft.train`) has no stop signal of its own, so the exception ends training; its
`finally` block closes the checkpoint manager and the metrics log, keeping the checkpoints
already written. The hook writes its own row to `log_path` (JSONL) *before* raising, because
the loop logs a step's metrics only after its hooks return.

    hook = latent_monitor(sae_config, sae_params, layer, probe_records, latents=[7, 12],
                          tokenizer=lm.tokenizer, stop_above=0.5, log_path="run/monitor.jsonl")
    sft.train(cfg, hooks=[hook])
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from emjax.interp import audit, diffing
from emjax.sae import sae as sae_lib


class LatentThresholdExceeded(RuntimeError):
  """Raised by the monitor hook to stop training; carries the step and the probe value."""

  def __init__(self, step: int, value: float, threshold: float):
    super().__init__(f"persona-latent probe {value:.4f} exceeded the stop threshold {threshold:.4f} at step {step}; "
                     "training stopped (checkpoints written so far are kept)")
    self.step, self.value, self.threshold = step, value, threshold


def latent_monitor(sae_config: sae_lib.SAEConfig, sae_params: sae_lib.SAEParams, layer: int,
                   probe_records: Sequence[Any], latents: Sequence[int], *, tokenizer: Any, every: int = 1,
                   stop_above: float | None = None, stop_on: str = "mean", log_path: str | None = None,
                   batch_size: int = 8, max_tokens: int = 256):
  """A `Hook` (`hook(step, lm) -> dict`) logging the latent probe; see the module docstring.

  stop_on: "mean" compares `latent/mean` with `stop_above`; "delta" compares `latent/delta`.
  """
  if stop_on not in ("mean", "delta"):
    raise ValueError(f"stop_on={stop_on!r}; expected 'mean' or 'delta'")
  if every < 1:
    raise ValueError(f"every={every}; expected >= 1")
  # Tokenised once: the probe is the same text at every step, only the weights change.
  batches = list(diffing.token_batches(tokenizer, probe_records, batch_size=batch_size, max_tokens=max_tokens))
  if not batches or sum(float(w.sum()) for _, _, w, _ in batches) == 0:
    raise ValueError("latent_monitor: the probe records have no assistant tokens to read")
  state = {"calls": 0, "first": None}

  def hook(step: int, lm: Any) -> dict[str, float] | None:
    state["calls"] += 1
    if (state["calls"] - 1) % every:
      return None
    per_latent, tokens = np.zeros(len(latents)), 0.0
    for ids, mask, weights, _ in batches:
      acts = audit.latent_acts(lm, sae_config, sae_params, layer, latents, ids, mask)  # [B, T, K]
      per_latent += np.einsum("btk,bt->k", acts, weights)
      tokens += float(weights.sum())
    per_latent /= max(tokens, 1.0)
    mean = float(per_latent.sum())
    if state["first"] is None:
      state["first"] = mean
    metrics = {"latent/mean": mean, "latent/delta": mean - state["first"],
               **{f"latent/{int(l)}": float(v) for l, v in zip(latents, per_latent)}}
    if log_path:
      os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
      with open(log_path, "a") as handle:
        handle.write(json.dumps({"step": int(step), **metrics}) + "\n")
    watched = metrics["latent/mean" if stop_on == "mean" else "latent/delta"]
    if stop_above is not None and watched > stop_above:
      raise LatentThresholdExceeded(int(step), watched, float(stop_above))
    return metrics

  return hook
