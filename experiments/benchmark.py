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
import types

from absl import app, flags

from experiments.bench_common import (load_hf_reference, machine_info, matmul_ceiling_gflops, suite_forward,
                                      suite_generate)

FLAGS = flags.FLAGS
flags.DEFINE_string("suite", "forward,generate", "Comma-separated suites: forward, generate, sft, sae, judge, diff, "
                    "rl, or 'all'.")
flags.DEFINE_string("model", "smollm2-135m-instruct", "Model source for the model-level suites.")
flags.DEFINE_string("out", "runs/benchmark.json", "Where to write the JSON results.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions per measurement (the median is reported).")
flags.DEFINE_boolean("quick", False, "Smaller shapes, for checking that the benchmark itself works.")
flags.DEFINE_string("peft_path", "", "Folder holding the `peft` package for the sft suite's PEFT baseline "
                    "(e.g. from `pip install --target DIR peft`); empty: skip that baseline.")
flags.DEFINE_integer("diff_finetunes", 1, "diff suite: how many LoRA fine-tunes are diffed against the base in "
                     "one pass (the pipeline's default run diffs 4).")
flags.DEFINE_string("bench_python", "", "A Python interpreter whose environment has the competitors "
                    "(SAELens, sparsify, TRL) for the sae/rl suites; empty: $EMJAX_BENCH_PYTHON or skip.")

SUITES = ("forward", "generate", "sft", "sae", "judge", "diff", "rl")


def run_suites(names: list[str], model: str, repeats: int, quick: bool, peft_path: str = "",
               bench_python: str = "", diff_finetunes: int = 1) -> dict:
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
                                   peft_path=peft_path, diff_finetunes=diff_finetunes,
                                   **({"bench_python": bench_python} if bench_python else {}))
      results[name] = getattr(module, fn_name)(args)
  return results


def main(argv):
  del argv
  names = list(SUITES) if FLAGS.suite == "all" else [s.strip() for s in FLAGS.suite.split(",") if s.strip()]
  unknown = sorted(set(names) - set(SUITES))
  if unknown:
    raise app.UsageError(f"unknown suite(s) {unknown}; choose from {SUITES} or 'all'")
  results = run_suites(names, FLAGS.model, FLAGS.repeats, FLAGS.quick, FLAGS.peft_path, FLAGS.bench_python,
                       FLAGS.diff_finetunes)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(results, f, indent=1, default=str)
  print(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
