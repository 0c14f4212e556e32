"""The GRPO loop on a tiny random model: learning, exact resume, grader outages, checkpoint gates."""

import json
import os

import jax
import numpy as np
import pytest

from configs.rl import get_config
from emjax.judge.base import Judgment
from emjax.models import lm as lm_lib
from emjax.models.config import ModelConfig
from emjax.train import graders, grpo, metrics_log

TINY = ModelConfig(family="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                   num_kv_heads=1, head_dim=16, pad_token_id=0, name="tiny")
PROMPTS = [[1 + i, 2 + i, 3 + i, 4 + i] for i in range(8)]
TARGET = 7  # the toy task: "say token 7"


def toy_config(workdir, **changes):
  c = get_config("quick")
  c.workdir = str(workdir)
  c.max_new_tokens = 8
  c.prompts_per_step = 4
  c.group_size = 8
  c.eval_every = 0
  c.tensorboard = False
  c.checkpoint.every = 100
  for key, value in changes.items():
    target = c
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return c


def run(cfg, reward_fn, evaluate=None):
  lm = lm_lib.random_model(TINY, seed=0)
  return grpo.train(cfg, reward_fn=reward_fn, lm=lm, prompts=(PROMPTS, PROMPTS), evaluate=evaluate, progress=False)


def test_reward_rises_on_the_toy_task(tmp_path):
  """Fails if the advantage sign, the gradient sign or the group normalisation is wrong."""
  cfg = toy_config(tmp_path, mode="full", steps=30, **{"optim.lr": 3e-3, "grpo.beta": 0.0})
  run(cfg, graders.token_fraction_grader(TARGET))
  rewards = [row["reward_mean"] for row in metrics_log.read_metrics(str(tmp_path))]
  assert len(rewards) == 30
  first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
  assert first < 0.1             # ~1/32 at random init
  assert last > first + 0.2, rewards
  rows = metrics_log.read_metrics(str(tmp_path))
  for name in ("reward_std", "kl", "entropy", "response_length", "clip_fraction", "loss", "grad_norm"):
    assert name in rows[-1], name
  assert all(row["clip_fraction"] == 0.0 for row in rows)   # one update per batch: the ratio is 1


def _strip_times(rows):
  return [{k: v for k, v in row.items() if not k.endswith("_s") and k != "tokens_per_s"} for row in rows]


@pytest.mark.slow  # three short runs, each compiling its step
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
  base = dict(steps=4, **{"checkpoint.every": 2, "optim.lr": 1e-2})
  straight, _ = run(toy_config(tmp_path / "a", **base), graders.token_fraction_grader(TARGET))

  calls = {"n": 0}
  good = graders.token_fraction_grader(TARGET)

  def dies_at_step_3(prompts, completions):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("killed")
    return good(prompts, completions)

  with pytest.raises(KeyboardInterrupt):
    run(toy_config(tmp_path / "b", **base), dies_at_step_3)
  resumed, summary = run(toy_config(tmp_path / "b", **base), good)
  assert summary["resumed_from"] == 2
  for a, b in zip(jax.tree.leaves(straight.lora), jax.tree.leaves(resumed.lora)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _strip_times(metrics_log.read_metrics(str(tmp_path / "a"))) == \
      _strip_times(metrics_log.read_metrics(str(tmp_path / "b")))


class DownJudge:
  """An HTTP judge that is down: every call raises."""
  name = "openai:down"

  def __init__(self):
    self.calls = 0

  def score(self, questions, answers, rubric="accuracy"):
    self.calls += 1
    raise ConnectionError("judge endpoint refused the connection")


def test_judge_outage_is_retried_reported_and_leaves_weights_untouched(tmp_path):
  judge = DownJudge()
  reward = graders.judge_accuracy_grader(judge, retries=2, sleep=lambda s: None)
  cfg = toy_config(tmp_path, steps=2, **{"optim.lr": 1e-2})
  tuned, summary = run(cfg, lambda p, c: reward([str(x) for x in p], [str(x) for x in c]))
  rows = metrics_log.read_metrics(str(tmp_path))
  assert [row["reward_failures"] for row in rows] == [32, 32]
  assert all(row["skipped_update"] == 1 for row in rows)
  assert judge.calls == 2 * 3                 # one batch per step, 1 try + 2 retries
  assert reward.stats["failed_rows"] == 64 and len(reward.failures) == 2
  assert "refused the connection" in reward.failures[0]["error"]
  # adapter B stays exactly 0: no update was made from missing rewards
  assert all(float(np.abs(np.asarray(ab[1])).max()) == 0.0 for ab in tuned.lora.values())


def test_partial_grader_failure_masks_rows_and_training_goes_on(tmp_path):
  good = graders.token_fraction_grader(TARGET)

  def half_failing(prompts, completions):
    values = good(prompts, completions)
    return [v if i % 2 else float("nan") for i, v in enumerate(values)]

  tuned, _ = run(toy_config(tmp_path, steps=2, **{"optim.lr": 1e-2}), half_failing)
  rows = metrics_log.read_metrics(str(tmp_path))
  assert [row["reward_failures"] for row in rows] == [16, 16]
  assert all(np.isfinite(row["loss"]) and "skipped_update" not in row for row in rows)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tuned.lora))


def test_select_checkpoint_is_the_latest_passing_both_gates():
  evals = [{"step": 5, "strict_incoherent": 0.00, "loose_incoherent": 0.10},
           {"step": 10, "strict_incoherent": 0.04, "loose_incoherent": 0.14},   # passes
           {"step": 15, "strict_incoherent": 0.06, "loose_incoherent": 0.10},   # strict fails
           {"step": 20, "strict_incoherent": 0.01, "loose_incoherent": 0.16}]   # loose fails
  assert grpo.select_checkpoint(evals)["step"] == 10
  assert grpo.passes_gates({"strict_incoherent": 0.05, "loose_incoherent": 0.15})   # gates are inclusive
  assert grpo.select_checkpoint(evals[2:]) is None
  with pytest.raises(KeyError, match="loose_incoherent"):
    grpo.passes_gates({"strict_incoherent": 0.0})


def test_loop_evaluates_saved_checkpoints_and_reports_the_gate_choice(tmp_path):
  table = {2: (0.02, 0.08), 4: (0.10, 0.12)}   # step 4 fails the strict gate -> step 2 is reported

  def evaluate(step, lm):
    assert lm.lora is not None
    strict, loose = table[step]
    return {"misaligned": 0.1 * step, "strict_incoherent": strict, "loose_incoherent": loose}

  cfg = toy_config(tmp_path, steps=4, eval_every=2, **{"checkpoint.every": 100})
  _, summary = run(cfg, graders.token_fraction_grader(TARGET), evaluate=evaluate)
  assert summary["selected_checkpoint"]["step"] == 2
  assert os.path.isdir(tmp_path / "checkpoints" / "2")        # the chosen checkpoint exists on disk
  evals = [json.loads(line) for line in open(tmp_path / "evals.jsonl")]
  assert [(e["step"], e["passes_gates"]) for e in evals] == [(2, True), (4, False)]
  rows = metrics_log.read_metrics(str(tmp_path))
  assert rows[1]["eval/misaligned"] == pytest.approx(0.2)


@pytest.mark.slow  # a subprocess with 8 fake CPU devices
def test_sharded_run_matches_single_device(tmp_path):
  import subprocess
  import sys
  import textwrap
  script = textwrap.dedent(f"""
      import jax, numpy as np
      assert jax.device_count() == 8, jax.devices()
      from tests.test_grpo_loop import toy_config, run, TARGET
      from emjax.train import graders
      single, _ = run(toy_config({str(tmp_path / 'one')!r}, steps=2, **{{"optim.lr": 1e-2}}),
                      graders.token_fraction_grader(TARGET))
      cfg = toy_config({str(tmp_path / 'mesh')!r}, steps=2, **{{"optim.lr": 1e-2}})
      cfg.mesh.data, cfg.mesh.fsdp = 2, 4
      sharded, _ = run(cfg, graders.token_fraction_grader(TARGET))
      for a, b in zip(jax.tree.leaves(single.lora), jax.tree.leaves(sharded.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)  # reduction order
      print("OK")
  """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env,
                          cwd=repo)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")
