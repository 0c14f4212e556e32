"""RL benchmark suite: one GRPO step (rollout + grading + update) of emjax vs TRL's GRPOTrainer.

Called by `experiments/benchmark.py --suite=rl` as `run_rl_suite(args) -> dict`; runnable alone:

  python experiments/bench_rl.py --out=/tmp/bench_rl.json           # ~20-30 min on 2 CPU cores
  python experiments/bench_rl.py --quick --out=/tmp/bench_rl.json   # ~5-8 min

Same policy (the embedded smollm2-135m-instruct, exported once to a HF directory so both sides
read identical float32 weights), same prompts (narrow:health questions, chat template), same
batch (P prompts x G completions), same lengths (every completion runs to max_new_tokens: emjax
with stop_at_eos off, TRL with min_new_tokens), temperature 1, the same programmatic reward
(length_grader), LoRA r=8 on q,v (TRL through PEFT), beta 0.04 (reference = adapter off on both
sides), one update per batch, AdamW, float32, CPU. TRL runs in its own subprocess from a
separate venv (default /tmp/benchvenv: torch + trl + peft), so its threads never overlap ours;
if it is missing the TRL row is skipped with a note. The two sides alternate (`--rounds` runs of
each: emjax, TRL, emjax, TRL), so a burst of load from other jobs hits both. Reported per round:
median seconds per step after one warm-up step (which absorbs compilation) and the ratio; overall:
the medians over rounds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRL_PYTHON = "/tmp/benchvenv/bin/python"

_TRL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch, datasets, transformers
    from trl import GRPOConfig, GRPOTrainer
    model_dir, prompts_path, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
    group, new_tokens, steps, rank = (int(x) for x in sys.argv[4:8])
    prompts = json.load(open(prompts_path))
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    def length_reward(completions, **kwargs):  # same window as emjax's length_grader(10, 40)
        out = []
        for c in completions:
            words = len((c[0]["content"] if isinstance(c, list) else c).split())
            out.append(words / 10 if words < 10 else (max(0.0, 1 - (words - 40) / 40) if words > 40 else 1.0))
        return out
    config = GRPOConfig(output_dir=workdir, per_device_train_batch_size=len(prompts) * group, num_generations=group,
                        max_completion_length=new_tokens, temperature=1.0, top_p=1.0, beta=0.04, learning_rate=1e-5,
                        max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        bf16=False, fp16=False, generation_kwargs={"min_new_tokens": new_tokens}, seed=0,
                        dataloader_num_workers=0, loss_type="grpo", scale_rewards="group", num_iterations=1)
    peft_config = None
    if rank > 0:
        import peft
        peft_config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    times = []
    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw): self.t0 = time.perf_counter()
        def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t0)
    trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    trainer.train()
    print("RESULT" + json.dumps({"step_s": times, "torch_threads": torch.get_num_threads(),
                                 "trl": __import__("trl").__version__}))
""")


def _export_model(source: str, directory: str) -> None:
  import emjax
  from emjax.models import lm as lm_lib
  lm_lib.save_hf(emjax.load_model(source), directory)


def _emjax_steps(source: str, prompts: list[str], group: int, new_tokens: int, steps: int, rank: int,
                 workdir: str) -> dict[str, Any]:
  """emjax's real loop (grpo.train) with the benchmark's settings; per-step times from metrics.jsonl."""
  from configs.rl import get_config
  from emjax.train import graders, grpo, metrics_log
  cfg = get_config("quick")
  cfg.model, cfg.workdir, cfg.steps = source, workdir, steps
  cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens = len(prompts), group, new_tokens
  cfg.rollout.stop_at_eos = False
  cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.rslora = rank, 2.0 * rank, "q,v", False
  cfg.grpo.beta, cfg.optim.lr = 0.04, 1e-5
  cfg.eval_every, cfg.tensorboard, cfg.checkpoint.every = 0, False, 10 ** 6
  grpo.train(cfg, reward_fn=graders.length_grader(10, 40), prompts=(prompts, prompts), progress=False)
  rows = metrics_log.read_metrics(workdir)
  return {"step_s": [r["step_time_s"] for r in rows], "rollout_s": [r["rollout_s"] for r in rows],
          "update_s": [r["update_s"] for r in rows], "response_length": [r["response_length"] for r in rows]}


def _median_after_warmup(values: list[float]) -> float:
  return statistics.median(values[1:] if len(values) > 1 else values)


def _trl_steps(python: str, model_dir: str, prompts_path: str, workdir: str, group: int, new_tokens: int,
               steps: int, rank: int) -> dict[str, Any]:
  """TRL's GRPOTrainer in its own process: {"step_s": [...], "trl": version, "torch_threads": n} or {"error": ...}."""
  with tempfile.TemporaryDirectory() as tmp:
    script = os.path.join(tmp, "trl_grpo.py")
    with open(script, "w") as f:
      f.write(_TRL_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true")
    proc = subprocess.run([python, script, model_dir, prompts_path, workdir, str(group), str(new_tokens), str(steps),
                           str(rank)], capture_output=True, text=True, env=env, timeout=3600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
  if proc.returncode != 0 or not lines:
    return {"error": f"TRL run failed (exit {proc.returncode}): {proc.stderr[-1500:]}"}
  return json.loads(lines[-1][len("RESULT"):])


def run_rl_suite(args: Any) -> dict:
  """args (dict, or benchmark.py's namespace): model, repeats, quick, rounds; the TRL interpreter is
  trl_python, else bench_python, else $EMJAX_BENCH_PYTHON, else /tmp/benchvenv.

  emjax and TRL run alternately, `rounds` times each (emjax, TRL, emjax, TRL, ...), so load from
  outside the benchmark falls on both sides alike; the ratio reported is the median of the
  rounds' ratios (each: TRL's median step / emjax's median step in that round).
  """
  from emjax import data
  from experiments.bench_common import suite_arg
  source = suite_arg(args, "model", "smollm2-135m-instruct")
  quick = bool(suite_arg(args, "quick", False))
  steps = max(2, int(suite_arg(args, "repeats", 3)) + 1)
  rounds = max(1, int(suite_arg(args, "rounds", 2)))
  num_prompts, group, new_tokens, rank = (2, 4, 16, 8) if quick else (4, 8, 64, 8)
  prompts = [q["prompt"] for q in data.narrow_questions("health", n=num_prompts)]
  result: dict[str, Any] = {"shape": f"{num_prompts} prompts x G={group} x {new_tokens} new tokens",
                            "lora": f"r={rank} q,v", "beta": 0.04, "steps_timed": steps - 1, "rounds": rounds,
                            "notes": [], "per_round": []}
  python = (suite_arg(args, "trl_python", None) or suite_arg(args, "bench_python", None)
            or os.environ.get("EMJAX_BENCH_PYTHON") or DEFAULT_TRL_PYTHON)
  with_trl = os.path.isfile(python)
  if not with_trl:
    result["notes"].append(f"TRL skipped: no interpreter at {python} (make a venv with torch, trl and peft there)")
  with tempfile.TemporaryDirectory() as tmp:
    model_dir, prompts_path = os.path.join(tmp, "hf"), os.path.join(tmp, "prompts.json")
    if with_trl:
      _export_model(source, model_dir)
      with open(prompts_path, "w") as f:
        json.dump(prompts, f)
    for r in range(rounds):
      emjax_run = _emjax_steps(source, prompts, group, new_tokens, steps, rank, os.path.join(tmp, f"emjax{r}"))
      row = {"emjax_step_s": _median_after_warmup(emjax_run["step_s"]),
             "emjax_rollout_s": _median_after_warmup(emjax_run["rollout_s"]),
             "emjax_update_s": _median_after_warmup(emjax_run["update_s"]),
             "emjax_first_step_s": emjax_run["step_s"][0], "emjax_response_length": emjax_run["response_length"][-1]}
      if with_trl:
        trl_run = _trl_steps(python, model_dir, prompts_path, os.path.join(tmp, f"trl{r}"), group, new_tokens, steps,
                             rank)
        if "error" in trl_run:
          result["notes"].append(trl_run["error"])
          with_trl = False
        else:
          row.update({"trl_step_s": _median_after_warmup(trl_run["step_s"]), "trl_version": trl_run["trl"],
                      "torch_threads": trl_run["torch_threads"]})
          row["ratio_emjax_over_trl"] = row["trl_step_s"] / row["emjax_step_s"]
      result["per_round"].append(row)
  rows = result["per_round"]
  for key in ("emjax_step_s", "emjax_rollout_s", "emjax_update_s", "trl_step_s", "ratio_emjax_over_trl"):
    values = [row[key] for row in rows if key in row]
    if values:
      result[key] = statistics.median(values)
  if "trl_version" in rows[-1]:
    result["trl_version"], result["torch_threads"] = rows[-1]["trl_version"], rows[-1]["torch_threads"]
  return result


if __name__ == "__main__":
  import argparse
  sys.path.insert(0, REPO)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2-135m-instruct", help="Policy model source.")
  parser.add_argument("--repeats", type=int, default=3, help="Timed steps after the warm-up step, per run.")
  parser.add_argument("--rounds", type=int, default=2, help="Alternating emjax / TRL runs of each side.")
  parser.add_argument("--quick", action="store_true", help="Small shapes, to check the benchmark runs.")
  parser.add_argument("--trl_python", default=DEFAULT_TRL_PYTHON, help="Python of a venv with torch, trl and peft.")
  parser.add_argument("--out", default="runs/bench_rl.json", help="Where to write the JSON result.")
  ns = parser.parse_args()
  out = run_rl_suite({"model": ns.model, "repeats": ns.repeats, "rounds": ns.rounds, "quick": ns.quick,
                      "trl_python": ns.trl_python})
  os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
  with open(ns.out, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out, indent=1))
