"""The paper's story as pipeline stages (see configs/pipeline.py and README "The main job").

Each stage reads only its config sections and upstream results, writes into its own folder of
the workdir, and resumes when rerun (see runner.py). Heavy lifting lives in the library:
fine-tuning in emjax.train.sft, evaluation in emjax.judge.evaluate, the SAE in emjax.sae,
diffing/steering/detection in emjax.interp. This file only wires them into one experiment.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np

from emjax.pipeline.runner import Context, Stage

# ----------------------------------------------------------------------------- shared resources
# Loaded once per process and shared by the stages (a resumed run reloads them cheaply).


@functools.lru_cache(maxsize=4)
def base_model(source: str):
  import emjax
  return emjax.load_model(source)


@functools.lru_cache(maxsize=4)
def judge_for(spec: str):
  from emjax.judge import make_judge
  return make_judge(spec)


def eval_questions(config) -> list:
  from emjax.data import load_questions
  questions = load_questions(config.eval.questions)
  n = int(config.eval.num_questions)
  if n and n < len(questions):
    # spread the subset over the categories rather than taking the first few
    by_category: dict[str, list] = {}
    for q in questions:
      by_category.setdefault(q.category, []).append(q)
    picked, depth = [], 0
    while len(picked) < n:
      for group in by_category.values():
        if depth < len(group) and len(picked) < n:
          picked.append(group[depth])
      depth += 1
    questions = picked
  return questions


def evaluate(ctx: Context, lm, workdir: str, label: str, intervention=None, steering=None) -> dict:
  from emjax.judge.evaluate import evaluate_model
  c = ctx.config
  return evaluate_model(lm, eval_questions(c), judge=judge_for(c.judge), rubric=c.rubric,
                        samples_per_question=int(c.eval.samples_per_question),
                        max_new_tokens=int(c.eval.max_new_tokens), temperature=float(c.eval.temperature),
                        seed=int(c.seed), workdir=workdir, intervention=intervention, label=label,
                        steering=steering, n_boot=500)


def headline(summary: dict) -> dict:
  """The few numbers the report tables show, with their CI."""
  keys = ("misaligned_share", "misaligned_ci", "incoherent_strict", "incoherent_loose", "n_answers",
          "mean_aligned", "mean_coherent")
  out = {k: summary.get(k) for k in keys if k in summary}
  for k in ("misaligned", "incoherence_strict", "incoherence_loose"):
    if k in summary:
      out[k] = summary[k]
  return out


def finetuned_model(ctx: Context, name: str):
  """Base + the adapter trained by the finetune stage (or the mixture fine-tunes of detect)."""
  from emjax.models import lora as lora_lib
  info = ctx.results["finetune"]["runs"].get(name) or ctx.results["detect_finetunes"]["runs"][name]
  return lora_lib.attach_adapter(base_model(ctx.config.model), info["adapter"])


def sft_config(ctx: Context, *, data: str, workdir: str, n: int, seed_offset: int = 0, lr=None, batch_size=None,
               max_steps: int = 0, eval_every: int = 0, checkpoint_every=None):
  c, s = ctx.config, ctx.config.sft
  cfg = c.sft_template.copy_and_resolve_references()
  cfg.model = c.model
  cfg.workdir = workdir
  cfg.mode = s.mode
  cfg.seed = int(c.seed) + seed_offset
  cfg.data.train = data
  cfg.data.n = int(n)
  cfg.data.max_len = int(s.max_len)
  cfg.data.layout = "pack"
  cfg.lora.rank = int(s.rank)
  cfg.lora.alpha = float(s.alpha)
  cfg.lora.targets = s.targets
  cfg.lora.layers = s.layers
  cfg.optim.lr = float(lr if lr is not None else s.lr)
  cfg.optim.warmup_steps = 2
  cfg.batch_size = int(batch_size or s.batch_size)
  cfg.epochs = int(s.epochs)
  cfg.max_steps = int(max_steps)
  cfg.eval_every = int(eval_every)
  cfg.checkpoint.every = int(checkpoint_every or s.checkpoint_every)
  cfg.checkpoint.keep = 2
  cfg.tensorboard = False
  return cfg


def run_finetune(ctx: Context, name: str, data: str, workdir: str, **kwargs) -> dict:
  from emjax.train import sft
  cfg = sft_config(ctx, data=data, workdir=workdir, n=kwargs.pop("n", ctx.config.sft.n), **kwargs)
  _, summary = sft.train(cfg, lm=base_model(ctx.config.model), progress=False)
  adapter = os.path.join(workdir, "adapter")
  if not os.path.isdir(adapter):
    raise FileNotFoundError(f"fine-tune {name!r} finished but wrote no adapter at {adapter}")
  return {"adapter": adapter, "data": data, "train": summary}


# ----------------------------------------------------------------------------- stages

def stage_baseline(ctx: Context) -> dict:
  lm = base_model(ctx.config.model)
  summary = evaluate(ctx, lm, ctx.stage_dir("baseline"), label="original")
  return {"summary": summary}


def stage_finetune(ctx: Context) -> dict:
  runs = {}
  for i, ft in enumerate(ctx.config.finetunes):
    ctx.log(f"    fine-tune {i + 1}/{len(ctx.config.finetunes)}: {ft['name']} on {ft['data']}")
    runs[ft["name"]] = {**run_finetune(ctx, ft["name"], ft["data"], os.path.join(ctx.stage_dir("finetune"), ft["name"])),
                        "role": ft["role"], "control_of": ft.get("control_of", "")}
  return {"runs": runs}


def stage_eval_finetunes(ctx: Context) -> dict:
  out = {}
  for name in ctx.results["finetune"]["runs"]:
    lm = finetuned_model(ctx, name)
    out[name] = evaluate(ctx, lm, os.path.join(ctx.stage_dir("eval_finetunes"), name), label=name)
  return {"summaries": out}


def stage_sae(ctx: Context) -> dict:
  from emjax.sae import pipeline as sae_pipeline
  c = ctx.config
  lm = base_model(c.model)
  if c.sae_path:
    return sae_pipeline.describe_existing(c.sae_path, lm)
  cfg = c.sae.copy_and_resolve_references()
  cfg.seed = int(c.seed)
  return sae_pipeline.train_on_model(lm, ctx.stage_dir("sae"), cfg, progress=False)


STAGES_READS = {
    "baseline": ("model", "seed", "judge", "rubric", "eval"),
    "finetune": ("model", "seed", "finetunes", "sft", "sft_template"),
    "eval_finetunes": ("judge", "rubric", "eval"),
    "sae": ("model", "seed", "sae", "sae_path"),
}


def estimate_eval_s(config) -> float:
  n_questions = int(config.eval.num_questions) or 44
  tokens = n_questions * int(config.eval.samples_per_question) * int(config.eval.max_new_tokens)
  return 10 + tokens / 60.0  # ~60 new tokens/s on 2 busy cores, plus judging


def stages() -> list[Stage]:
  from emjax.pipeline import em_analysis
  return [
      Stage("baseline", stage_baseline, reads=STAGES_READS["baseline"], estimate_s=estimate_eval_s,
            describe="evaluate the original model"),
      Stage("finetune", stage_finetune, reads=STAGES_READS["finetune"],
            estimate_s=lambda c: len(c.finetunes) * (20 + int(c.sft.n) * int(c.sft.epochs) * 0.35),
            describe="narrow bad data, controls and the positive control"),
      Stage("eval_finetunes", stage_eval_finetunes, reads=STAGES_READS["eval_finetunes"], after=("finetune",),
            estimate_s=lambda c: len(c.finetunes) * estimate_eval_s(c), describe="misalignment of every fine-tune"),
      Stage("sae", stage_sae, reads=STAGES_READS["sae"],
            estimate_s=lambda c: 20 + int(c.sae.harvest_tokens) / 400 + int(c.sae.num_steps) * 0.15,
            describe="harvest activations and train the SAE on the original model"),
      *em_analysis.stages(),
  ]
