"""Cached, resumable stages.

A stage is a function of (the config sections it reads, the results of the stages it depends
on). Its fingerprint hashes exactly those, so:
  * a finished stage whose fingerprint is unchanged is not rerun (its result is read back);
  * a changed config section reruns the stages that read it and everything downstream;
  * a stage killed half-way resumes in place on the next run (stages write their partial work
    — checkpoints, JSONL rows — into their own folder), unless its fingerprint changed, in
    which case the stale folder is cleared first.

Layout: <workdir>/<stage>/started.json, <workdir>/<stage>/done.json (result + fingerprint),
plus whatever the stage writes there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  run: Callable[["Context"], dict]     # returns a JSON-able result
  reads: tuple[str, ...] = ()          # top-level config sections the stage depends on
  after: tuple[str, ...] = ()          # stages whose results it uses
  estimate_s: Callable[[Any], float] = lambda config: 60.0   # rough cost, for the ETA line
  describe: str = ""


@dataclasses.dataclass
class Context:
  config: Any                           # ml_collections.ConfigDict (or dict-like)
  workdir: str
  results: dict[str, dict]
  log: Callable[[str], None] = print

  def stage_dir(self, name: str) -> str:
    path = os.path.join(self.workdir, name)
    os.makedirs(path, exist_ok=True)
    return path


def _section(config, key: str):
  value = config
  for part in key.split("."):
    value = value[part]
  return value.to_dict() if hasattr(value, "to_dict") else value


def fingerprint(stage: Stage, config, upstream: dict[str, str]) -> str:
  payload = {"stage": stage.name, "reads": {k: _section(config, k) for k in stage.reads},
             "after": {k: upstream[k] for k in stage.after}}
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: str, value: Any) -> None:
  """Atomic JSON write: a crash never leaves a half-written file behind."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, default=str)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _format_s(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def run_stages(stages: Sequence[Stage], config, workdir: str, *, only: Sequence[str] | None = None,
               log: Callable[[str], None] = print) -> dict[str, dict]:
  """Runs (or reads back) each stage in order; returns {stage name: result}."""
  names = [s.name for s in stages]
  unknown = sorted(set(only or ()) - set(names))
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown}; the stages are {names}")
  os.makedirs(workdir, exist_ok=True)
  ctx = Context(config, workdir, {}, log)
  prints: dict[str, str] = {}
  selected = [s for s in stages if not only or s.name in only]
  remaining_estimate = sum(s.estimate_s(config) for s in selected)
  start_all = time.perf_counter()
  for index, stage in enumerate(stages):
    fp = fingerprint(stage, config, prints)
    prints[stage.name] = fp
    stage_path = os.path.join(workdir, stage.name)
    done_path = os.path.join(stage_path, "done.json")
    done = read_json(done_path) if os.path.isfile(done_path) else None
    if done is not None and done.get("fingerprint") == fp:
      ctx.results[stage.name] = done["result"]
      if stage in selected:
        log(f"[{index + 1}/{len(stages)}] {stage.name}: cached ({_format_s(done.get('seconds', 0))} when run)")
        remaining_estimate -= stage.estimate_s(config)
      continue
    if stage not in selected:
      log(f"[{index + 1}/{len(stages)}] {stage.name}: not selected and not cached; later stages that need it will fail")
      continue
    started_path = os.path.join(stage_path, "started.json")
    if os.path.isfile(started_path) and read_json(started_path).get("fingerprint") != fp:
      log(f"[{index + 1}/{len(stages)}] {stage.name}: config changed since the last run; clearing {stage_path}")
      shutil.rmtree(stage_path)
    elif done is not None:  # finished once, but with another config: start clean
      shutil.rmtree(stage_path)
    os.makedirs(stage_path, exist_ok=True)
    resuming = os.path.isfile(started_path)
    write_json(started_path, {"fingerprint": fp, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    estimate = stage.estimate_s(config)
    elapsed = time.perf_counter() - start_all
    log(f"[{index + 1}/{len(stages)}] {stage.name}: {'resuming' if resuming else 'running'}"
        f"{' — ' + stage.describe if stage.describe else ''} (est. {_format_s(estimate)}; "
        f"elapsed {_format_s(elapsed)}, ETA for the rest {_format_s(max(remaining_estimate, 0))})")
    t0 = time.perf_counter()
    result = stage.run(ctx)
    seconds = time.perf_counter() - t0
    write_json(done_path, {"fingerprint": fp, "result": result, "seconds": seconds})
    ctx.results[stage.name] = result
    remaining_estimate -= estimate
    log(f"[{index + 1}/{len(stages)}] {stage.name}: done in {_format_s(seconds)}")
  log(f"pipeline finished in {_format_s(time.perf_counter() - start_all)} (workdir {workdir})")
  return ctx.results
