"""Model diffing: which SAE latents did the misaligned fine-tunes turn up?

  python experiments/diff.py --workdir=runs/diff --model=smollm2-135m-instruct --sae=runs/sae/sae \
      --finetunes=bad=runs/health_bad/adapter:misaligned,good=runs/health_good/adapter:aligned \
      --questions=builtin:questions/core --num_samples=4

  # unsupervised variant: diff on the fine-tuning data itself (no sampling)
  python experiments/diff.py --workdir=runs/diff_data --model=... --sae=... --finetunes=... \
      --data=builtin:health/incorrect_subtle --max_records=512

Cost on 2 CPU cores with the 135M model: ~1-2 min per 100 records for base + 2 adapters
(one fused program per batch shape); sampling answers (--questions) dominates otherwise.

The base model and every fine-tune read the same records in one compiled program per batch
(fine-tunes: `name=path[:label[:bad_fraction]]`, path an emjax adapter directory or a full model).
With --questions, answers are sampled from every model (base included) and pooled.
Workdir: config.json, answers.jsonl (per model, resumable), stats.npz, ranking.json,
latents.{json,md,png} (report), summary.json. Rerunning resumes: sampled answers and stats are reused.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import app, flags

def define_flags() -> None:
  """Flags are defined only when this file runs as a program, so the binaries (and
  `run`) can be imported side by side without absl's duplicate-flag error."""
  flags.DEFINE_string("workdir", None, "Output directory; rerunning with the same one resumes.")
  flags.DEFINE_string("model", "smollm2-135m-instruct", "Base model: built-in name, HF directory or .gguf.")
  flags.DEFINE_string("sae", None, "SAE directory (SAELens or sparsify layout) trained on the base model.")
  flags.DEFINE_integer("layer", None, "Residual layer the SAE reads (default: the SAE file's hook_layer).")
  flags.DEFINE_string("finetunes", None, "Comma list of name=path[:misaligned|aligned|unknown[:bad_fraction]].")
  flags.DEFINE_string("data", None, "Records to diff on (dataset spec or chat JSONL): the unsupervised variant.")
  flags.DEFINE_string("questions", "builtin:questions/core", "Question set to sample answers on (when --data is unset).")
  flags.DEFINE_integer("num_samples", 2, "Answers sampled per question per model (--questions mode).")
  flags.DEFINE_integer("max_new_tokens", 64, "Answer length cap when sampling.")
  flags.DEFINE_integer("max_records", None, "Use at most this many records of --data.")
  flags.DEFINE_enum("where", "assistant", ["assistant", "all"], "Tokens to average over: assistant answers or all.")
  flags.DEFINE_integer("batch_size", 8, "Records per forward batch.")
  flags.DEFINE_integer("max_tokens", 256, "Truncate each record to this many tokens.")
  flags.DEFINE_integer("top_n", 20, "Latents listed in the ranking and report.")
  flags.DEFINE_bool("subtract_aligned", False, "Rank by misaligned mean delta minus aligned fine-tunes' mean delta.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")


FLAGS = flags.FLAGS


def sampled_records(models: dict[str, Any], questions: list, answers_path: str, *, num_samples: int,
                    max_new_tokens: int, seed: int, batch_size: int) -> list[dict]:
  """Question + sampled answer chat records from every model; each model's answers are cached."""
  from emjax import sampling
  from emjax.interp import reports, steering
  done = reports.read_jsonl_rows(answers_path)
  have = {row["model"] for row in done}
  items = steering.question_texts(questions)
  prompts = [([{"role": "system", "content": s}] if s else []) + [{"role": "user", "content": t}] for _, t, s, _ in items]
  for name, lm in models.items():
    if name in have:
      continue
    out = sampling.generate(lm, prompts, max_new_tokens=max_new_tokens, seed=seed, num_samples=num_samples,
                            batch_size=batch_size)
    rows = [{"model": name, "question_id": items[p][0], "messages": prompts[p] + [{"role": "assistant", "content": text}]}
            for p, text in zip(out.prompt_index, out.texts)]
    reports.append_jsonl(answers_path, rows)
    done += rows
  return [{"messages": row["messages"], "metadata": {"model": row["model"]}} for row in done
          if row["model"] in models]


def run(*, workdir: str, model: str, sae: str, finetunes: str, layer: int | None = None, data: str | None = None,
        questions: str = "builtin:questions/core", num_samples: int = 2, max_new_tokens: int = 64,
        max_records: int | None = None, where: str = "assistant", batch_size: int = 8, max_tokens: int = 256,
        top_n: int = 20, subtract_aligned: bool = False, seed: int = 0, dtype: str = "float32",
        lm: Any = None) -> dict:
  """The whole diff (see module docstring). `lm` may be passed in (tests) instead of loading `model`."""
  import emjax
  from emjax import data as data_lib
  from emjax.interp import diffing, reports
  from emjax.sae import files as sae_files
  started = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  config = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool, type(None))) and k != "started"}
  reports.write_json(os.path.join(workdir, "config.json"), config)
  lm = lm if lm is not None else emjax.load_model(model, dtype=dtype)
  sae_config, sae_params, layer = sae_files.load_for_model(sae, lm, layer)
  specs = diffing.parse_finetunes(finetunes)
  if not specs:
    raise ValueError("--finetunes names no fine-tune")
  models = {"base": lm, **{s.name: diffing.load_finetune(lm, s) for s in specs}}

  if data:
    records = diffing.load_records(data, max_records, seed)
    source = f"data:{data}"
  else:
    records = sampled_records(models, data_lib.load_questions(questions), os.path.join(workdir, "answers.jsonl"),
                              num_samples=num_samples, max_new_tokens=max_new_tokens, seed=seed, batch_size=32)
    source = f"sampled answers to {questions}"

  variants = [diffing.variant(name, m, misaligned=None if name == "base" else
                              next(s.misaligned for s in specs if s.name == name)) for name, m in models.items()]
  stats_path = os.path.join(workdir, "stats.npz")
  resumed = os.path.exists(stats_path) and diffing.LatentStats.load(stats_path).names == list(models)
  if resumed:
    stats = diffing.LatentStats.load(stats_path)
  else:
    batches = diffing.token_batches(lm.tokenizer, records, batch_size=batch_size, max_tokens=max_tokens, where=where)
    stats = diffing.latent_stats(lm, variants, sae_config, sae_params, layer, batches)
    stats.save(stats_path)
  deltas = diffing.deltas_vs_base(stats)
  misaligned = [s.name for s in specs if s.misaligned]
  aligned = [s.name for s in specs if s.misaligned is False] if subtract_aligned else []
  if not misaligned:
    raise ValueError("no fine-tune is labelled misaligned; label at least one (name=path:misaligned)")
  ranking = diffing.rank_latents(deltas, misaligned, top_n=top_n, aligned=aligned)
  reports.write_json(os.path.join(workdir, "ranking.json"),
                     {k: v for k, v in ranking.items() if k != "score"})
  report = reports.latent_report(lm, sae_config, sae_params, layer, ranking, stats, corpus=records[:256],
                                 top_n=min(top_n, 10))
  paths = reports.write_report(report, workdir, "latents", title=f"Latents turned up by {', '.join(misaligned)}")
  summary = {"layer": int(layer), "source": source, "records": len(records), "tokens": stats.tokens,
             "models": stats.names, "misaligned": misaligned, "aligned_subtracted": aligned,
             "top_increased": [e["latent"] for e in ranking["increased"]],
             "top_decreased": [e["latent"] for e in ranking["decreased"]],
             "top_score": ranking["increased"][0]["score"], "resumed": resumed, "files": paths,
             "wall_s": time.perf_counter() - started}
  reports.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def main(argv):
  del argv
  for name in ("workdir", "sae", "finetunes"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  summary = run(workdir=FLAGS.workdir, model=FLAGS.model, sae=FLAGS.sae, finetunes=FLAGS.finetunes, layer=FLAGS.layer,
                data=FLAGS.data, questions=FLAGS.questions, num_samples=FLAGS.num_samples,
                max_new_tokens=FLAGS.max_new_tokens, max_records=FLAGS.max_records, where=FLAGS.where,
                batch_size=FLAGS.batch_size, max_tokens=FLAGS.max_tokens, top_n=FLAGS.top_n,
                subtract_aligned=FLAGS.subtract_aligned, seed=FLAGS.seed, dtype=FLAGS.dtype)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
