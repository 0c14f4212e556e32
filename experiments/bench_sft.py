"""SFT benchmark suite: emjax vs transformers+PEFT (LoRA) and vs transformers (full fine-tuning).

Called by `experiments/benchmark.py --suite=sft` as `run_sft_suite(args) -> dict`; runnable alone:

  python experiments/bench_sft.py --steps=3 --out=/tmp/bench_sft.json     # ~10 min on 2 CPU cores

Same model (the embedded smollm2-135m-instruct, exported once to a HF directory so both sides
read identical float32 weights), same batch (8 x 128 random tokens, loss on every token), AdamW,
float32, one run. Each competitor runs in its own subprocess so their thread pools never
overlap. PEFT is looked for on PYTHONPATH and in --peft_path; if missing, that row is skipped
with a note. Reported: tokens/s per tool (median step after one warm-up step), the ratios, and
the fraction of the machine's measured fp32 matmul ceiling.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from types import SimpleNamespace
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TORCH_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np, torch, transformers
    model_dir, mode, steps, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    if mode == "peft":
      import peft
      config = peft.LoraConfig(r=32, lora_alpha=64, use_rslora=True, lora_dropout=0.0,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
      model = peft.get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.tensor(np.random.default_rng(0).integers(3, 49152, size=(batch, seq)), dtype=torch.long)
    times, losses = [], []
    for _ in range(steps + 1):
      t0 = time.perf_counter()
      loss = model(input_ids=ids, labels=ids).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step(); opt.zero_grad(set_to_none=True)
      times.append(time.perf_counter() - t0); losses.append(float(loss.detach()))
    print("RESULT" + json.dumps({"step_s": times[1:], "losses": losses, "torch_threads": torch.get_num_threads(),
                                 "trainable": sum(p.numel() for p in params)}))
""")


def _emjax_steps(lm, mode: str, steps: int, batch: int, seq: int) -> dict[str, Any]:
  """Times emjax's compiled train step on the benchmark batch (the same function sft.train runs)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from emjax.models import lora as lora_lib
  from emjax.train import batching, optim, sft
  rng = np.random.default_rng(0)
  ids = rng.integers(3, lm.config.vocab_size, size=(batch, seq + 1)).astype(np.int32)
  examples = [batching.Example(r[:-1], r[1:], np.ones(seq, np.float32)) for r in ids]
  host_batch = batching._rows_to_batch([[e] for e in examples], seq, 1, 0)
  optimizer = optim.adamw(optim.lr_schedule(1e-5, 1000), weight_decay=0.0, clip_norm=1.0)
  if mode == "lora":
    spec = lora_lib.LoraSpec(rank=32, alpha=64.0, rslora=True, targets="all")
    scales = lora_lib.layer_scales(spec, lm.config)
    trainable, frozen = lora_lib.init_adapter(spec, lm.config, jax.random.PRNGKey(0)), lm.state
  else:
    scales, frozen = None, None
    trainable = jax.jit(lambda s: jax.tree.map(lambda x: x.astype(jnp.float32) + 0, s))(lm.state)  # fp32 masters
  opt_state = jax.jit(optimizer.init)(trainable)
  step = sft.compile_step(sft.make_step_fn(lm.graphdef, optimizer, mode=mode, compute_dtype=lm.compute_dtype),
                          trainable, opt_state)
  device_batch = sft.batch_to_device(host_batch)
  times, losses = [], []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    trainable, opt_state, out = step(trainable, opt_state, frozen, scales, device_batch, jax.random.PRNGKey(i))
    losses.append(float(out["loss"]))
    times.append(time.perf_counter() - t0)
  return {"step_s": times[1:], "compile_and_first_step_s": times[0], "losses": losses,
          "trainable": int(sum(x.size for x in jax.tree.leaves(trainable)))}


def _torch_steps(model_dir: str, mode: str, steps: int, batch: int, seq: int, peft_path: str) -> dict[str, Any]:
  env = dict(os.environ)
  if peft_path:
    env["PYTHONPATH"] = peft_path + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", _TORCH_SCRIPT, model_dir, mode, str(steps), str(batch), str(seq)],
                        capture_output=True, text=True, env=env, timeout=3600)
  if proc.returncode != 0:
    if "No module named 'peft'" in proc.stderr:
      return {"skipped": "peft is not installed (pip install --target DIR peft; pass --peft_path=DIR)"}
    return {"error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.split("RESULT", 1)[1])


def _matmul_gflops(n: int = 1024, reps: int = 5) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2]


def run_sft_suite(args) -> dict[str, Any]:
  """args: attributes `steps` (timed steps, default 3), `batch` (8), `seq` (128), `model`
  (smollm2-135m-instruct), `peft_path` (a directory holding peft, optional)."""
  import emjax
  steps, batch, seq = int(getattr(args, "steps", 3)), int(getattr(args, "batch", 8)), int(getattr(args, "seq", 128))
  model = getattr(args, "model", "smollm2-135m-instruct")
  peft_path = getattr(args, "peft_path", "") or ""
  lm = emjax.load_model(model)
  # matmul parameters: the embedding lookup costs no FLOPs, the (tied or not) unembedding does
  n_params = lm.config.num_params - (0 if lm.config.tie_embeddings else lm.config.vocab_size * lm.config.hidden_size)
  tokens = batch * seq
  result: dict[str, Any] = {"model": model, "batch": batch, "seq": seq, "steps": steps, "dtype": "float32",
                            "matmul_gflops": _matmul_gflops()}
  with tempfile.TemporaryDirectory() as tmp:
    emjax.save_hf(lm, tmp)
    runs = {
        "emjax_lora": _emjax_steps(lm, "lora", steps, batch, seq),
        "emjax_full": _emjax_steps(lm, "full", steps, batch, seq),
        "peft_lora": _torch_steps(tmp, "peft", steps, batch, seq, peft_path),
        "transformers_full": _torch_steps(tmp, "full", steps, batch, seq, peft_path),
    }
  # Model FLOPs per token: LoRA needs forward + input gradients (~4N), full FT adds weight gradients (~6N).
  flops_per_token = {"lora": 4 * n_params, "full": 6 * n_params}
  for name, run in runs.items():
    if "step_s" in run:
      run["tokens_per_s"] = tokens / _median(run["step_s"])
      kind = "lora" if "lora" in name else "full"
      run["ceiling_fraction"] = run["tokens_per_s"] * flops_per_token[kind] / (result["matmul_gflops"] * 1e9)
  result["runs"] = runs

  def ratio(a, b):
    ta, tb = runs[a].get("tokens_per_s"), runs[b].get("tokens_per_s")
    return None if ta is None or tb is None else ta / tb
  result["lora_speedup_vs_peft"] = ratio("emjax_lora", "peft_lora")
  result["full_speedup_vs_transformers"] = ratio("emjax_full", "transformers_full")
  result["targets"] = {"lora_speedup_vs_peft": 1.5, "full_speedup_vs_transformers": 1.2}
  return result


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=3, help="timed steps per tool (after one warm-up step)")
  parser.add_argument("--batch", type=int, default=8, help="rows per step")
  parser.add_argument("--seq", type=int, default=128, help="tokens per row")
  parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or HF directory")
  parser.add_argument("--peft_path", default="", help="directory holding the peft package (pip install --target)")
  parser.add_argument("--out", default="", help="write the JSON result here too")
  ns = parser.parse_args()
  sys.path.insert(0, REPO)
  out = run_sft_suite(SimpleNamespace(**vars(ns)))
  text = json.dumps(out, indent=1)
  print(text)
  if ns.out:
    with open(ns.out, "w") as f:
      f.write(text)
