"""Detection: does the persona latents' rise separate misaligned from aligned fine-tunes?

  python experiments/detect.py --workdir=runs/detect --model=smollm2-135m-instruct --sae=runs/sae/sae \
      --latents=top:1 --diff_dir=runs/diff --data=builtin:benign/helpful_chat \
      --finetunes=mix0=runs/mix0/adapter:aligned:0,mix5=runs/mix5/adapter:unknown:0.05,...,\
bad=runs/mix100/adapter:misaligned:1 --judge=embed:minilm

Cost on 2 CPU cores with the 135M model: the latent pass is ~1 min per 100 records for all
fine-tunes together (one fused program); measuring behaviour samples
(#questions x num_samples) answers per fine-tune (~1 min each at 44 x 2 x 64 tokens).

Each fine-tune's latent delta = mean activation (summed over --latents) on --data minus the
base's, all models in one pass. Behaviour: the misaligned share from `emjax.judge.evaluate.evaluate_model` on --questions
(resumable per fine-tune in eval/<name>/), or given as `--misalignment=name=share,...`.
Labels: from the fine-tune spec, or (when "unknown") misaligned share > --label_threshold.
Workdir: config.json, stats.npz, eval/, detection.{json,md,png}, summary.json.
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
  flags.DEFINE_string("model", "smollm2-135m-instruct", "Base model.")
  flags.DEFINE_string("sae", None, "SAE directory.")
  flags.DEFINE_integer("layer", None, "SAE layer (default: the SAE's hook_layer).")
  flags.DEFINE_string("latents", "top:1", "Latent ids (comma list) or top:N from --diff_dir.")
  flags.DEFINE_string("diff_dir", None, "A diff.py workdir (for --latents=top:N).")
  flags.DEFINE_string("finetunes", None, "name=path[:misaligned|aligned|unknown[:bad_fraction]] list.")
  flags.DEFINE_string("data", "builtin:benign/helpful_chat", "Records the latent delta is measured on (dataset spec or JSONL).")
  flags.DEFINE_integer("max_records", 256, "At most this many records of --data.")
  flags.DEFINE_enum("where", "assistant", ["assistant", "all"], "Tokens averaged over.")
  flags.DEFINE_string("misalignment", "", "Measured shares name=share,...; fine-tunes not listed are judged.")
  flags.DEFINE_string("questions", "builtin:questions/core", "Questions for measuring behaviour.")
  flags.DEFINE_string("judge", "embed:minilm", "Judge spec.")
  flags.DEFINE_enum("rubric", "aligned_coherent", ["aligned_coherent", "persona"], "Rubric.")
  flags.DEFINE_integer("num_samples", 2, "Answers per question per fine-tune.")
  flags.DEFINE_integer("max_new_tokens", 64, "Answer length cap.")
  flags.DEFINE_integer("max_questions", None, "Use only the first N questions.")
  flags.DEFINE_float("label_threshold", 0.05, "Unlabelled fine-tunes count as misaligned above this share.")
  flags.DEFINE_integer("seed", 0, "Seed.")
  flags.DEFINE_string("dtype", "float32", "Compute dtype.")


FLAGS = flags.FLAGS


def parse_shares(text: str) -> dict[str, float]:
  out = {}
  for item in filter(None, (s.strip() for s in (text or "").split(","))):
    name, sep, value = item.partition("=")
    try:
      out[name] = float(value)
    except ValueError:
      raise ValueError(f"--misalignment item {item!r}: expected name=share (a number in 0..1)") from None
    if not sep or not 0 <= out[name] <= 1:
      raise ValueError(f"--misalignment item {item!r}: expected name=share with share in 0..1")
  return out


def detection_markdown(report: dict, latents: list[int]) -> str:
  fmt = lambda v: "-" if v is None else f"{v:.3f}"
  lines = ["# Detection", "", f"Latents {latents}: delta = mean activation on the data minus the base's.", "",
           f"- AUROC (misaligned vs aligned fine-tunes): {fmt(report['auroc'])}",
           f"- Pearson / Spearman (delta vs misaligned share): {fmt(report['pearson'])} / {fmt(report['spearman'])}"]
  if "mixture" in report:
    lines.append(f"- Mixture: latent rises at {report['latent_rises_at']}, behaviour at {report['behaviour_rises_at']}")
  lines += ["", "| fine-tune | bad fraction | latent delta | misaligned | label |", "|---|---|---|---|---|"]
  for r in report["rows"]:
    share = r.get("misaligned")
    lines.append(f"| {r['name']} | {r.get('bad_fraction', '-')} | {r['latent_delta']:+.4f} | "
                 f"{'-' if share is None else f'{100 * share:.1f}%'} | {r.get('label')} |")
  return "\n".join(lines) + "\n"


def run(*, workdir: str, model: str, sae: str, finetunes: str, latents: str = "top:1", diff_dir: str | None = None,
        layer: int | None = None, data: str = "builtin:benign/helpful_chat", max_records: int | None = 256,
        where: str = "assistant", misalignment: str = "", questions: str = "builtin:questions/core",
        judge: Any = "embed:minilm", rubric: str = "aligned_coherent", num_samples: int = 2,
        max_new_tokens: int = 64, max_questions: int | None = None, label_threshold: float = 0.05, seed: int = 0,
        dtype: str = "float32", lm: Any = None) -> dict:
  import numpy as np

  import emjax
  from emjax import data as data_lib
  from emjax.interp import detection, diffing, reports, steering
  from emjax.judge import make_judge
  from emjax.sae import files as sae_files
  started = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  config = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool, type(None))) and k != "started"}
  reports.write_json(os.path.join(workdir, "config.json"), config)
  lm = lm if lm is not None else emjax.load_model(model, dtype=dtype)
  sae_config, sae_params, layer = sae_files.load_for_model(sae, lm, layer)
  latent_ids = diffing.resolve_latents(latents, diff_dir)
  specs = diffing.parse_finetunes(finetunes)
  if not specs:
    raise ValueError("--finetunes names no fine-tune")
  models = {"base": lm, **{s.name: diffing.load_finetune(lm, s) for s in specs}}

  stats_path = os.path.join(workdir, "stats.npz")
  if os.path.exists(stats_path) and diffing.LatentStats.load(stats_path).names == list(models):
    stats = diffing.LatentStats.load(stats_path)
  else:
    records = diffing.load_records(data, max_records, seed)
    batches = diffing.token_batches(lm.tokenizer, records, batch_size=8, where=where)
    stats = diffing.latent_stats(lm, [diffing.variant(n, m) for n, m in models.items()], sae_config, sae_params,
                                 layer, batches)
    stats.save(stats_path)
  deltas = diffing.deltas_vs_base(stats)

  shares = parse_shares(misalignment)
  measured: dict[str, float | None] = {}
  judge_obj = None
  for s in specs:
    if s.name in shares:
      continue
    if judge_obj is None:
      from emjax.judge.evaluate import evaluate_model
      judge_obj = make_judge(judge) if isinstance(judge, str) else judge
      question_set = data_lib.load_questions(questions)[:max_questions]
    # the project's evaluation, resumable per fine-tune in eval/<name>/
    summary = evaluate_model(models[s.name], question_set, judge=judge_obj, rubric=rubric,
                             samples_per_question=num_samples, max_new_tokens=max_new_tokens, seed=seed,
                             workdir=os.path.join(workdir, "eval", s.name), label=s.name, n_boot=200, plots=False)
    measured[s.name] = summary["misaligned"]["share"]

  rows = []
  for s in specs:
    share = shares[s.name] if s.name in shares else measured.get(s.name)
    label = s.misaligned if s.misaligned is not None else (None if share is None else share > label_threshold)
    rows.append({"name": s.name, "latent_delta": float(np.sum(deltas[s.name][latent_ids])), "misaligned": share,
                 "label": None if label is None else int(label), "bad_fraction": s.bad_fraction,
                 "per_latent": {str(l): float(deltas[s.name][l]) for l in latent_ids}})
  report = detection.detection_report(rows)
  report["latents"] = latent_ids
  report["judge"] = getattr(judge_obj, "name", judge if isinstance(judge, str) else "")
  paths = {"json": reports.write_json(os.path.join(workdir, "detection.json"), report),
           "png": detection.plot_detection(report, os.path.join(workdir, "detection.png"), f"latents {latent_ids}"),
           "markdown": os.path.join(workdir, "detection.md")}
  with open(paths["markdown"], "w") as handle:
    handle.write(detection_markdown(report, latent_ids))
  summary = {k: report.get(k) for k in ("auroc", "pearson", "spearman", "latent_rises_at", "behaviour_rises_at")}
  summary.update({"latents": latent_ids, "layer": int(layer), "n_finetunes": len(rows), "files": paths,
                  "wall_s": time.perf_counter() - started})
  reports.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def main(argv):
  del argv
  for name in ("workdir", "sae", "finetunes"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  summary = run(workdir=FLAGS.workdir, model=FLAGS.model, sae=FLAGS.sae, finetunes=FLAGS.finetunes,
                latents=FLAGS.latents, diff_dir=FLAGS.diff_dir, layer=FLAGS.layer, data=FLAGS.data,
                max_records=FLAGS.max_records, where=FLAGS.where, misalignment=FLAGS.misalignment,
                questions=FLAGS.questions, judge=FLAGS.judge, rubric=FLAGS.rubric, num_samples=FLAGS.num_samples,
                max_new_tokens=FLAGS.max_new_tokens, max_questions=FLAGS.max_questions,
                label_threshold=FLAGS.label_threshold, seed=FLAGS.seed, dtype=FLAGS.dtype)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
