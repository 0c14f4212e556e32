r"""Side-by-side speed benchmarks: emjax vs the tool a user would otherwise pick, in one run.

    python -m experiments.benchmark --suite=forward,generate --out=runs/benchmark.json

Absolute times on a shared 2-core machine are noise; ratios measured in the same run are not.
Every suite also reports the fraction of the machine's own fp32 matmul ceiling it reaches
(measured at the start of the run). Results go to JSON (and are printed as a table).

Suites: forward, generate (this file); sft, sae, judge, diff, rl (their own modules, imported
when asked for). Competitors that are not installed are skipped with a note, never faked.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import types
from typing import Callable

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("suite", "forward,generate", "Comma-separated suites: forward, generate, sft, sae, judge, diff, "
                    "rl, or 'all'.")
flags.DEFINE_string("model", "smollm2-135m-instruct", "Model source for the model-level suites.")
flags.DEFINE_string("out", "runs/benchmark.json", "Where to write the JSON results.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions per measurement (the median is reported).")
flags.DEFINE_boolean("quick", False, "Smaller shapes, for checking that the benchmark itself works.")
flags.DEFINE_string("peft_path", "", "Folder holding the `peft` package for the sft suite's PEFT baseline "
                    "(e.g. from `pip install --target DIR peft`); empty: skip that baseline.")
flags.DEFINE_string("bench_python", "", "A Python interpreter whose environment has the competitors "
                    "(SAELens, sparsify, TRL) for the sae/rl suites; empty: $EMJAX_BENCH_PYTHON or skip.")

SUITES = ("forward", "generate", "sft", "sae", "judge", "diff", "rl")


def timed(fn: Callable[[], object], repeats: int) -> float:
  """Median wall seconds of fn() after one warm-up call (which absorbs compilation)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_ceiling_gflops(n: int = 2048, repeats: int = 5) -> dict:
  """The machine's fp32 matmul rate, measured with both XLA and (if installed) PyTorch."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  secs = timed(lambda: f(a).block_until_ready(), repeats)
  out = {"xla_gflops": 2 * n ** 3 / secs / 1e9}
  try:
    import torch
    t = torch.ones(n, n)
    out["torch_gflops"] = 2 * n ** 3 / timed(lambda: t @ t, repeats) / 1e9
    out["torch_threads"] = torch.get_num_threads()
  except ImportError:
    pass
  out["ceiling_gflops"] = max(v for k, v in out.items() if k.endswith("gflops"))
  return out


def forward_flops(cfg, batch: int, seq: int) -> float:
  """Matmul FLOPs of one forward (projections, attention scores/values, unembedding)."""
  d, f, h, k, dh, L, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.num_layers, cfg.vocab_size)
  per_token = L * (2 * d * h * dh + 2 * 2 * d * k * dh + 2 * h * dh * d + 3 * 2 * d * f) + 2 * d * v
  attention = L * 2 * 2 * h * dh * seq * seq / 2  # causal: half the score matrix
  return batch * (seq * per_token + attention)


def load_hf_reference(source: str):
  """transformers' model for the same weights (GGUF read by transformers), or None + why."""
  try:
    import torch
    import transformers
  except ImportError as e:
    return None, f"transformers/torch not installed ({e})"
  from emjax.io import registry
  path = registry.resolve_builtin(source) if source in registry.BUILTIN_FILES else source
  if path.endswith(".gguf"):
    directory, filename = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval(), None


def suite_forward(lm, hf_model, ceiling: dict, repeats: int, quick: bool) -> dict:
  import jax
  import numpy as np
  batch, seq = (2, 32) if quick else (8, 128)
  ids = np.random.default_rng(0).integers(100, lm.config.vocab_size, size=(batch, seq)).astype(np.int32)
  emjax_s = timed(lambda: jax.block_until_ready(lm.logits(ids)), repeats)
  flops = forward_flops(lm.config, batch, seq)
  result = {"shape": f"{batch}x{seq}", "dtype": "float32", "emjax_tokens_per_s": batch * seq / emjax_s,
            "emjax_fraction_of_ceiling": flops / emjax_s / 1e9 / ceiling["ceiling_gflops"]}
  if hf_model is not None:
    import torch
    t_ids = torch.tensor(ids, dtype=torch.long)
    with torch.no_grad():
      hf_s = timed(lambda: hf_model(t_ids).logits, repeats)
    result.update({"transformers_tokens_per_s": batch * seq / hf_s,
                   "transformers_fraction_of_ceiling": flops / hf_s / 1e9 / ceiling["ceiling_gflops"],
                   "ratio_emjax_over_transformers": hf_s / emjax_s})
  return result


def suite_generate(lm, hf_model, ceiling: dict, repeats: int, quick: bool) -> dict:
  import emjax
  import numpy as np
  new_tokens = 16 if quick else 128
  topics = ["the ocean", "a small town", "friendship", "winter", "robots", "cooking", "music", "trains"]
  out = {}
  for batch in ((4,) if quick else (32, 8)):
    prompts = [f"Write a short story about {topics[i % len(topics)]} (version {i})." for i in range(batch)]
    run = lambda: emjax.generate(lm, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=0, stop_at_eos=False,
                                 batch_size=batch)
    emjax_s = timed(run, max(1, repeats - 1))
    prompt_len = max(len(p) for p in run().prompt_token_ids)
    mean_ctx = prompt_len + new_tokens / 2
    decode_flops = forward_flops(lm.config, batch, 1) + batch * lm.config.num_layers * 4 * lm.config.num_heads * \
        lm.config.head_dim * mean_ctx
    row = {"batch": batch, "new_tokens": new_tokens, "temperature": 1.0,
           "emjax_new_tokens_per_s": batch * new_tokens / emjax_s,
           "emjax_fraction_of_ceiling": decode_flops * new_tokens / emjax_s / 1e9 / ceiling["ceiling_gflops"]}
    if hf_model is not None:
      import torch
      tok = lm.tokenizer
      rendered = [tok.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts]
      width = max(map(len, rendered))
      ids = torch.tensor([[tok.pad_id] * (width - len(r)) + r for r in rendered])
      mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rendered])

      def hf_run():
        torch.manual_seed(0)
        with torch.no_grad():
          return hf_model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_id)
      hf_s = timed(hf_run, max(1, repeats - 1))
      row.update({"transformers_new_tokens_per_s": batch * new_tokens / hf_s,
                  "ratio_emjax_over_transformers": hf_s / emjax_s})
    out[f"batch{batch}"] = row
  return out


def machine_info() -> dict:
  import jax
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def run_suites(names: list[str], model: str, repeats: int, quick: bool, peft_path: str = "",
               bench_python: str = "") -> dict:
  import emjax
  results: dict = {"machine": machine_info(), "model": model, "quick": quick}
  results["matmul"] = ceiling = matmul_ceiling_gflops(1024 if quick else 2048)
  lm = hf_model = None
  if {"forward", "generate"} & set(names):
    lm = emjax.load_model(model)
    hf_model, why = load_hf_reference(model)
    if why:
      results["notes"] = [f"transformers comparison skipped: {why}"]
  if "forward" in names:
    results["forward"] = suite_forward(lm, hf_model, ceiling, repeats, quick)
  if "generate" in names:
    results["generate"] = suite_generate(lm, hf_model, ceiling, repeats, quick)
  external = {"sft": ("experiments.bench_sft", "run_sft_suite"), "sae": ("experiments.bench_sae", "run_sae_suite"),
              "judge": ("experiments.bench_judge", "run_judge_suite"), "diff": ("experiments.bench_diff", "run_diff_suite"),
              "rl": ("experiments.bench_rl", "run_rl_suite")}
  for name in names:
    if name in external:
      module_name, fn_name = external[name]
      try:
        module = __import__(module_name, fromlist=[fn_name])
      except ImportError as e:
        results[name] = {"skipped": f"{module_name} is not available ({e})"}
        continue
      args = types.SimpleNamespace(model=model, repeats=repeats, quick=quick, ceiling=ceiling,
                                   steps=repeats, batch=2 if quick else 8, seq=32 if quick else 128,
                                   peft_path=peft_path, **({"bench_python": bench_python} if bench_python else {}))
      results[name] = getattr(module, fn_name)(args)
  return results


def main(argv):
  del argv
  names = list(SUITES) if FLAGS.suite == "all" else [s.strip() for s in FLAGS.suite.split(",") if s.strip()]
  unknown = sorted(set(names) - set(SUITES))
  if unknown:
    raise app.UsageError(f"unknown suite(s) {unknown}; choose from {SUITES} or 'all'")
  results = run_suites(names, FLAGS.model, FLAGS.repeats, FLAGS.quick, FLAGS.peft_path, FLAGS.bench_python)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(results, f, indent=1, default=str)
  print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
