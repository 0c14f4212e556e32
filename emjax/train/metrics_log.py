"""Training metrics: `metrics.jsonl` (one JSON object per logged step) + TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping


def _plain(value: Any) -> Any:
  """NumPy / JAX scalars -> Python numbers; NaN and inf kept as strings JSON can hold."""
  try:
    value = value.item()
  except AttributeError:
    pass
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricsLog:
  """Appends metrics as they are produced, so a crash loses nothing already logged.

  A class because it owns two open files (the JSONL and the TensorBoard writer).
  """

  def __init__(self, workdir: str, *, resume_from_step: int | None = None, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if resume_from_step is not None:
      truncate_after(self.path, resume_from_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def truncate_after(path: str, step: int) -> None:
  """Drops logged rows after `step` (they belong to the part of a killed run that is being redone)."""
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    rows = [line for line in f if line.strip()]
  kept = [line for line in rows if _row_step(line) <= step]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(kept)


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line).get("step", -1))
  except (json.JSONDecodeError, TypeError, ValueError):
    return 1 << 62  # a torn last line from a killed process: drop it


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
