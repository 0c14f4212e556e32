"""Stage caching: reruns skip finished work, config changes rerun only what depends on them,
and a stage killed half-way resumes without losing its partial work."""

import os

import ml_collections
import pytest

from emjax.pipeline.runner import Stage, run_stages


def make_stages(calls, crash_at=-1):
  def first(ctx):
    calls.append("first")
    return {"value": ctx.config.a.x * 2}

  def second(ctx):
    calls.append("second")
    part = os.path.join(ctx.stage_dir("second"), "partial.txt")
    done_items = open(part).read().split() if os.path.exists(part) else []
    for item in range(len(done_items), 4):
      if crash_at == item:
        raise KeyboardInterrupt("simulated kill")
      with open(part, "a") as f:
        f.write(f"{item} ")
    return {"value": ctx.results["first"]["value"] + ctx.config.b.y, "items": len(open(part).read().split())}

  def third(ctx):
    calls.append("third")
    return {"value": ctx.results["second"]["value"] + 1}

  return [Stage("first", first, reads=("a",)), Stage("second", second, reads=("b",), after=("first",)),
          Stage("third", third, after=("second",))]


def config(x=1, y=10):
  return ml_collections.ConfigDict({"a": {"x": x}, "b": {"y": y}})


def test_rerun_is_cached_and_changes_rerun_downstream_only(tmp_path):
  calls = []
  results = run_stages(make_stages(calls), config(), str(tmp_path), log=lambda _: None)
  assert results["third"]["value"] == 13 and calls == ["first", "second", "third"]
  calls.clear()
  assert run_stages(make_stages(calls), config(), str(tmp_path), log=lambda _: None) == results
  assert calls == []
  run_stages(make_stages(calls), config(y=20), str(tmp_path), log=lambda _: None)
  assert calls == ["second", "third"]
  calls.clear()
  out = run_stages(make_stages(calls), config(x=5, y=20), str(tmp_path), log=lambda _: None)
  assert calls == ["first", "second", "third"] and out["third"]["value"] == 31


def test_killed_stage_resumes_with_its_partial_work(tmp_path):
  calls = []
  with pytest.raises(KeyboardInterrupt):
    run_stages(make_stages(calls, crash_at=2), config(), str(tmp_path), log=lambda _: None)
  assert open(tmp_path / "second" / "partial.txt").read().split() == ["0", "1"]
  calls.clear()
  out = run_stages(make_stages(calls), config(), str(tmp_path), log=lambda _: None)
  assert calls == ["second", "third"]  # first was cached, second resumed from item 2
  assert out["second"]["items"] == 4
  assert out == run_stages(make_stages([]), config(), str(tmp_path / "fresh"), log=lambda _: None)


def test_a_changed_config_clears_a_half_finished_stage(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    run_stages(make_stages([], crash_at=2), config(), str(tmp_path), log=lambda _: None)
  out = run_stages(make_stages([]), config(y=99), str(tmp_path), log=lambda _: None)
  assert out["second"]["items"] == 4 and out["second"]["value"] == 101


def test_unknown_stage_name_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="unknown stage"):
    run_stages(make_stages([]), config(), str(tmp_path), only=["fourth"], log=lambda _: None)
