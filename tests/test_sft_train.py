"""The SFT loop end to end on a tiny random model with the embedded tokenizer: overfitting,
kill-and-resume equality, NaN stop, gradient accumulation, outputs, 8 devices vs 1."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax

from emjax.models import lora as lora_lib
from emjax.train import sft
from emjax.train.metrics_log import read_metrics
from tests.test_sft_common import records, sft_config, tiny_chat_model, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # several compiled training runs: ~1 min each on a busy 2-core machine
def test_overfitting_four_examples_drives_assistant_loss_near_zero(tmp_path):
  data = write_jsonl(tmp_path / "four.jsonl", records(4))
  cfg = sft_config(tmp_path / "run", data, mode="full", epochs=60, **{"optim.lr": 1e-2, "optim.warmup_steps": 0,
                                                                      "optim.decay": "constant",
                                                                      "optim.weight_decay": 0.0})
  tuned, summary = sft.train(cfg, lm=tiny_chat_model(), progress=False)
  losses = [row["loss"] for row in read_metrics(cfg.workdir)]
  assert len(losses) == 60 and losses[0] > 9.0   # ~ln(49152) at random init
  assert losses[-1] < 0.05, losses[-10:]
  assert summary["data"]["loss_tokens"] > 0 and summary["outputs"]["hf"].endswith("model_hf")


@pytest.mark.slow  # several compiled training runs: ~1 min each on a busy 2-core machine
def test_killed_run_resumes_with_identical_losses_and_adapter(tmp_path):
  data = write_jsonl(tmp_path / "eight.jsonl", records(8))
  overrides = dict(epochs=3, **{"checkpoint.every": 2, "lora.rank": 4, "lora.dropout": 0.1, "optim.lr": 1e-2,
                                "optim.warmup_steps": 1, "eval_every": 1})
  clean = sft_config(tmp_path / "clean", data, **overrides)
  lm = tiny_chat_model()
  _, summary = sft.train(clean, lm=lm, progress=False)
  assert summary["steps"] == 6

  killed = sft_config(tmp_path / "killed", data, **overrides)

  def crash_at_step_5(step, _):
    if step == 5:
      raise KeyboardInterrupt("simulated kill")
  with pytest.raises(KeyboardInterrupt):
    sft.train(killed, lm=lm, hooks=[crash_at_step_5], progress=False)
  assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["2", "4"]
  _, resumed = sft.train(killed, lm=lm, progress=False)
  assert resumed["resumed_from"] == 4

  want = read_metrics(clean.workdir)
  got = read_metrics(killed.workdir)
  assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # the half-done step 5 was not logged twice
  np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-6)
  a, _ = lora_lib.load_adapter(str(tmp_path / "clean" / "adapter"), lm.config)
  b, _ = lora_lib.load_adapter(str(tmp_path / "killed" / "adapter"), lm.config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8), a, b)
  assert json.load(open(tmp_path / "killed" / "config.json"))["lora"]["rank"] == 4


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  data = write_jsonl(tmp_path / "eight.jsonl", records(8))
  cfg = sft_config(tmp_path / "run", data, mode="full", epochs=3,
                   **{"optim.lr": 1e30, "optim.clip_norm": 0.0, "optim.warmup_steps": 0, "checkpoint.every": 1})
  with pytest.raises(sft.NonFiniteLossError, match=r"at step \d+ .*Last good checkpoint: step \d+") as error:
    sft.train(cfg, lm=tiny_chat_model(), progress=False)
  bad = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  assert f"Last good checkpoint: step {bad - 1} in" in str(error.value) and 2 <= bad <= 6
  saved = sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints"))
  assert saved == list(range(1, bad))           # nothing saved from the bad step on, nothing deleted
  rows = read_metrics(cfg.workdir)
  assert all(np.isfinite(r["loss"]) for r in rows[:-1]) and rows[-1]["loss"] in ("nan", "inf", "-inf")
  assert rows[-1]["step"] == bad


@pytest.mark.slow  # several compiled training runs: ~1 min each on a busy 2-core machine
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
  data = write_jsonl(tmp_path / "eight.jsonl", records(8))
  lm = tiny_chat_model()
  runs = {}
  for accum in (1, 2):
    cfg = sft_config(tmp_path / f"accum{accum}", data, mode="full", epochs=2, grad_accum=accum,
                     **{"optim.lr": 1e-3, "optim.warmup_steps": 0})
    tuned, _ = sft.train(cfg, lm=lm, progress=False)
    runs[accum] = ([r["loss"] for r in read_metrics(cfg.workdir)], tuned.weights()["q_proj"])
  np.testing.assert_allclose(runs[2][0], runs[1][0], rtol=1e-5)
  np.testing.assert_allclose(runs[2][1], runs[1][1], atol=1e-6)


def test_outputs_metrics_and_hooks(tmp_path):
  data = write_jsonl(tmp_path / "eight.jsonl", records(8))
  cfg = sft_config(tmp_path / "run", data, epochs=1, eval_every=1, tensorboard=True, export_hf=True)
  seen = []

  def hook(step, lm):
    seen.append((step, lm.lora is not None))
    return {"answer_len": 3.0}
  tuned, summary = sft.train(cfg, lm=tiny_chat_model(), hooks=[hook], progress=False)
  assert seen == [(1, True), (2, True)]
  rows = read_metrics(cfg.workdir)
  for key in ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "eval/answer_len"):
    assert key in rows[-1], key
  assert rows[0]["lr"] < rows[-1]["lr"] or cfg.optim.warmup_steps == 0  # warmup
  files = set(os.listdir(tmp_path / "run"))
  assert {"config.json", "summary.json", "metrics.jsonl", "tb", "adapter", "merged_hf", "checkpoints"} <= files
  assert os.listdir(tmp_path / "run" / "tb")
  assert summary["trainable_params"] == sum(x.size for x in jax.tree.leaves(
      lora_lib.load_adapter(summary["outputs"]["adapter"], tuned.config)[0]))


_EIGHT_DEVICES = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {repo!r})
    import jax
    from emjax.train import sft
    from emjax.train.metrics_log import read_metrics
    from tests.test_sft_common import records, sft_config, tiny_chat_model, write_jsonl
    assert jax.device_count() == 8, jax.devices()
    data = write_jsonl({tmp!r} + "/data.jsonl", records(16))
    out = {{}}
    for mode in ("full", "lora"):
      for name, mesh in (("one", {{"data": 1, "fsdp": 1}}), ("eight", {{"data": 2, "fsdp": 4}})):
        cfg = sft_config({tmp!r} + f"/{{mode}}_{{name}}", data, mode=mode, batch_size=8, epochs=2, mesh=mesh,
                         **{{"optim.lr": 1e-3, "optim.warmup_steps": 0, "lora.rank": 4}})
        tuned, _ = sft.train(cfg, lm=tiny_chat_model(), progress=False)
        q = tuned.state["layers"]["q_proj"][...] if mode == "full" else tuned.lora["q_proj"][0]
        out[f"{{mode}}_{{name}}"] = {{"losses": [r["loss"] for r in read_metrics(cfg.workdir)],
                                      "spec": str(q.sharding.spec) if hasattr(q.sharding, "spec") else "",
                                      "devices": len(q.sharding.device_set)}}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = _EIGHT_DEVICES.format(repo=REPO, tmp=str(tmp_path))
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  for mode in ("full", "lora"):
    one, eight = out[f"{mode}_one"], out[f"{mode}_eight"]
    assert len(one["losses"]) == 4 and eight["devices"] == 8 and "fsdp" in eight["spec"], eight
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)


def test_configs_resolve_and_name_valid_lora_specs():
  import importlib.util
  from emjax.models.config import ModelConfig
  qwen7b = ModelConfig(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                       num_heads=28, num_kv_heads=4, head_dim=128, attention_bias=True)
  for name, variants in (("sft", ["", "quick", "full", "rank1", "realign"]), ("sft_qwen7b", ["", "tpu", "full"])):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in variants:
      cfg = module.get_config(variant)
      assert cfg.mode in ("lora", "full") and cfg.batch_size % cfg.grad_accum == 0
      lora_spec = sft.lora_spec_from_config(cfg)
      lora_lib.resolve_layers(lora_spec.layers, qwen7b.num_layers)
      assert lora_lib.resolve_targets(lora_spec.targets)
  default = module.get_config("")
  assert (default.lora.rank, default.lora.alpha, default.lora.rslora, default.epochs) == (32, 64.0, True, 1)
  assert lora_lib.resolve_targets(default.lora.targets) == lora_lib.PROJECTIONS
