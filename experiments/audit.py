"""Data auditing: flag training examples that light up persona latents, before training.

  python experiments/audit.py --workdir=runs/audit --data=my_chats.jsonl --model=smollm2-135m-instruct \
      --sae=runs/sae/sae --latents=12,40 --top_k=100

  # measure it on a labelled mixture (metadata.is_bad marks the planted bad examples)
  python experiments/audit.py --workdir=runs/audit_mix --data="mix(builtin:health/incorrect_obvious=0.1,builtin:health/correct=0.9;n=1000)" \
      --model=... --sae=... --latents=top:3 --diff_dir=runs/diff

Cost on 2 CPU cores with the 135M model: one early-exit forward per record, ~1 min per 500
records of ~100 tokens; no generation.

Works on any chat JSONL (`{"messages": [...]}`, OpenAI-release `content.parts` too). Score =
mean over assistant tokens of the summed latent activations (--reduce=max: strongest token).
When records carry a 0/1 label (--label_field, default metadata.is_bad), precision/recall@k
and AUROC are reported. Workdir: config.json, scores.jsonl (one row per record, appended in
order: a rerun continues after the last scored record), flagged.jsonl (highest first),
summary.json, audit.md, audit.png.
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
  flags.DEFINE_string("data", None, "Chat records: JSONL path, dataset spec or mix(...) spec.")
  flags.DEFINE_string("model", "smollm2-135m-instruct", "Model whose residual the SAE reads.")
  flags.DEFINE_string("adapter", None, "Optional LoRA adapter directory applied to --model.")
  flags.DEFINE_string("sae", None, "SAE directory.")
  flags.DEFINE_integer("layer", None, "SAE layer (default: the SAE's hook_layer).")
  flags.DEFINE_string("latents", None, "Latent ids (comma list) or top:N from --diff_dir.")
  flags.DEFINE_string("diff_dir", None, "A diff.py workdir (for --latents=top:N).")
  flags.DEFINE_enum("where", "assistant", ["assistant", "all"], "Tokens scored.")
  flags.DEFINE_enum("reduce", "mean", ["mean", "max"], "Per-record reduction over tokens.")
  flags.DEFINE_string("label_field", "metadata.is_bad", "Dotted path of a 0/1 label in each record (for metrics).")
  flags.DEFINE_integer("top_k", 100, "Records written to flagged.jsonl.")
  flags.DEFINE_float("threshold", None, "Also require score >= threshold to flag.")
  flags.DEFINE_integer("max_records", None, "Audit at most this many records.")
  flags.DEFINE_integer("batch_size", 8, "Records per forward.")
  flags.DEFINE_integer("max_tokens", 256, "Truncate records to this many tokens.")
  flags.DEFINE_string("dtype", "float32", "Compute dtype.")


FLAGS = flags.FLAGS


def label_of(record: Any, field: str) -> int | None:
  node = record
  for part in field.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return None if node is None else int(bool(node))


def plot_scores(scores, labels, path: str) -> str:
  """Scores in rank order, bad examples marked (or a plain histogram without labels)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, ax = plt.subplots(figsize=(7, 3.5))
  order = np.argsort(-np.asarray(scores), kind="stable")
  ranked = np.asarray(scores)[order]
  if labels is not None:
    bad = np.asarray(labels)[order].astype(bool)
    ax.scatter(np.flatnonzero(~bad), ranked[~bad], s=6, color="tab:green", label="good")
    ax.scatter(np.flatnonzero(bad), ranked[bad], s=6, color="tab:red", label="bad")
    ax.legend()
  else:
    ax.plot(ranked, ".", markersize=3)
  ax.set_xlabel("rank")
  ax.set_ylabel("persona-latent score")
  ax.set_title("audit scores, highest first")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run(*, workdir: str, data: str, model: str, sae: str, latents: str, diff_dir: str | None = None,
        adapter: str | None = None, layer: int | None = None, where: str = "assistant", reduce: str = "mean",
        label_field: str = "metadata.is_bad", top_k: int = 100, threshold: float | None = None,
        max_records: int | None = None, batch_size: int = 8, max_tokens: int = 256, dtype: str = "float32",
        lm: Any = None) -> dict:
  import numpy as np

  import emjax
  from emjax import data as data_lib
  from emjax.interp import audit, diffing, reports
  from emjax.sae import files as sae_files
  started = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  config = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool, type(None))) and k != "started"}
  reports.write_json(os.path.join(workdir, "config.json"), config)
  lm = lm if lm is not None else emjax.load_model(model, dtype=dtype, adapter=adapter)
  sae_config, sae_params, layer = sae_files.load_for_model(sae, lm, layer)
  latent_ids = diffing.resolve_latents(latents, diff_dir)
  records = diffing.load_records(data, max_records)
  if not records:
    raise ValueError(f"{data}: no records to audit")

  scores_path = os.path.join(workdir, "scores.jsonl")
  scored = reports.read_jsonl_rows(scores_path)
  resumed_from = len(scored)
  chunk = 64 * batch_size   # append every chunk so a crash loses at most one chunk
  for start in range(len(scored), len(records), chunk):
    part = records[start:start + chunk]
    part_scores = audit.score_records(lm, sae_config, sae_params, layer, part, latent_ids, where=where, reduce=reduce,
                                      batch_size=batch_size, max_tokens=max_tokens)
    rows = [{"index": start + i, "score": float(s)} for i, s in enumerate(part_scores)]
    reports.append_jsonl(scores_path, rows)
    scored += rows
  scores = np.asarray([r["score"] for r in scored[:len(records)]])

  labels = [label_of(r, label_field) for r in records]
  has_labels = all(l is not None for l in labels) and 0 < sum(labels) < len(labels)
  metrics = audit.ranking_metrics(scores, labels, ks=sorted({10, 50, 100, top_k})) if has_labels else None
  flagged = audit.write_flagged(os.path.join(workdir, "flagged.jsonl"), records, scores, top_k=top_k,
                                threshold=threshold)
  png = plot_scores(scores, labels if has_labels else None, os.path.join(workdir, "audit.png"))
  summary = {"data": data, "records": len(records), "latents": latent_ids, "layer": int(layer), "where": where,
             "reduce": reduce, "flagged": flagged, "metrics": metrics, "resumed_from": resumed_from,
             "score_mean": float(scores.mean()), "score_max": float(scores.max()),
             "wall_s": time.perf_counter() - started}
  reports.write_json(os.path.join(workdir, "summary.json"), summary)
  lines = ["# Data audit", "", f"{len(records)} records of `{data}`, latents {latent_ids} at layer {layer} "
           f"({reduce} over {where} tokens); {flagged} flagged in flagged.jsonl.", ""]
  if metrics:
    lines += [f"- AUROC (bad vs good): {metrics['auroc']:.3f} (base rate {metrics['base_rate']:.3f})"]
    lines += [f"- precision@{k} {metrics[f'precision@{k}']:.3f}, recall@{k} {metrics[f'recall@{k}']:.3f}"
              for k in sorted({10, 50, 100, top_k}) if f"precision@{k}" in metrics]
  with open(os.path.join(workdir, "audit.md"), "w") as handle:
    handle.write("\n".join(lines) + "\n")
  return summary


def main(argv):
  del argv
  for name in ("workdir", "data", "sae", "latents"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  summary = run(workdir=FLAGS.workdir, data=FLAGS.data, model=FLAGS.model, sae=FLAGS.sae, latents=FLAGS.latents,
                diff_dir=FLAGS.diff_dir, adapter=FLAGS.adapter, layer=FLAGS.layer, where=FLAGS.where,
                reduce=FLAGS.reduce, label_field=FLAGS.label_field, top_k=FLAGS.top_k, threshold=FLAGS.threshold,
                max_records=FLAGS.max_records, batch_size=FLAGS.batch_size, max_tokens=FLAGS.max_tokens,
                dtype=FLAGS.dtype)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
