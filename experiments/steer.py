"""Steering sweeps: do the diffed latents control misalignment?

  python experiments/steer.py --workdir=runs/steer --model=smollm2-135m-instruct --sae=runs/sae/sae \
      --latents=top:5 --diff_dir=runs/diff --scales=0,0.1,0.2,0.4,0.75 \
      --finetunes=bad=runs/health_bad/adapter:misaligned --neg_scales=-0.1,-0.2,-0.4 \
      --judge=embed:minilm --num_samples=4

Cost on 2 CPU cores with the 135M model: each grid point samples (#questions x num_samples)
answers; ~1 min per point at 44 questions x 2 samples x 64 tokens, so the default grid is ~1 h.
--quick (8 questions, 1 sample, 32 tokens) takes a few minutes.

Grid, per model: each latent's unit decoder direction and a random direction of equal norm are
steered at c x median residual norm (layer L, every position) for c in --scales on the base and
--neg_scales on each misaligned fine-tune; then the mean-difference direction (misaligned minus
aligned answers' mean residual, from the c = 0 answers) is steered and, with the latents,
ablated. All points of a model share one compiled sampler. Every answer is judged; per point the
misaligned share and strict incoherence, per direction the strongest c with incoherence <= 10%.
Each point is an `emjax.judge.evaluate.evaluate_model` run in points/<model>/<point>/ (samples,
judgments, summary: resumable). Workdir: config.json, points/, results.jsonl (one row per point,
appended: reruns skip done points), summary.json, steer.md, steer.png.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Sequence

from absl import app, flags

def define_flags() -> None:
  """Flags are defined only when this file runs as a program, so the binaries (and
  `run`) can be imported side by side without absl's duplicate-flag error."""
  flags.DEFINE_string("workdir", None, "Output directory; rerunning with the same one resumes.")
  flags.DEFINE_string("model", "smollm2-135m-instruct", "Base model: built-in name, HF directory or .gguf.")
  flags.DEFINE_string("sae", None, "SAE directory whose decoder rows are steered.")
  flags.DEFINE_integer("layer", None, "Layer to steer (default: the SAE's hook_layer).")
  flags.DEFINE_string("latents", "top:3", "Comma list of latent ids, or top:N from --diff_dir's ranking.json.")
  flags.DEFINE_string("diff_dir", None, "A diff.py workdir (for --latents=top:N).")
  flags.DEFINE_string("finetunes", "", "name=path[:label] list; misaligned ones get negative steering (suppression).")
  flags.DEFINE_string("questions", "builtin:questions/core", "Question set.")
  flags.DEFINE_string("judge", "embed:minilm", "Judge spec (embed:minilm, local:<model>, openai:<model>).")
  flags.DEFINE_enum("rubric", "aligned_coherent", ["aligned_coherent", "persona"], "Rubric the judge grades with.")
  flags.DEFINE_string("scales", "0,0.1,0.2,0.4,0.75", "Steering strengths c (x median residual norm) on the base.")
  flags.DEFINE_string("neg_scales", "0,-0.1,-0.2,-0.4", "Strengths on misaligned fine-tunes (suppression).")
  flags.DEFINE_bool("random_control", True, "Also steer a random direction of equal norm.")
  flags.DEFINE_bool("mean_diff", True, "Also steer and ablate the mean-difference direction.")
  flags.DEFINE_bool("ablate_latents", True, "Also ablate each latent's decoder direction (all layers).")
  flags.DEFINE_float("max_incoherent", 0.10, "Incoherence cap for the strongest-coherent strength.")
  flags.DEFINE_integer("num_samples", 2, "Answers per question per grid point.")
  flags.DEFINE_integer("max_new_tokens", 64, "Answer length cap.")
  flags.DEFINE_integer("max_questions", None, "Use only the first N questions.")
  flags.DEFINE_bool("quick", False, "8 questions, 1 sample, 32 tokens: a smoke run in minutes.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (the same for every grid point).")
  flags.DEFINE_string("dtype", "float32", "Compute dtype.")


FLAGS = flags.FLAGS


def parse_floats(text: str) -> list[float]:
  try:
    return [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"expected a comma list of numbers, got {text!r}") from None


def plot_sweep(results: Sequence[dict], path: str) -> str:
  """One panel per model: misaligned share (solid) and incoherence (dashed) vs c, per direction."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  models = sorted({r["model"] for r in results})
  fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4), squeeze=False)
  for ax, model in zip(axes[0], models):
    rows = [r for r in results if r["model"] == model and r["mode"] == "steer"]
    for i, direction in enumerate(sorted({r["direction"] for r in rows})):
      nan = float("nan")   # a share with no valid answer is a gap in the line, not a 0
      points = sorted((r["scale"], nan if r["misaligned"] is None else r["misaligned"],
                       nan if r["incoherent"] is None else r["incoherent"]) for r in rows if r["direction"] == direction)
      colour = f"C{i}"
      ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", color=colour, label=direction)
      ax.plot([p[0] for p in points], [100 * p[2] for p in points], "x--", color=colour, alpha=0.6)
    ax.set_title(f"{model} (solid: misaligned, dashed: incoherent)", fontsize=9)
    ax.set_xlabel("c (x median residual norm)")
    ax.set_ylabel("% of answers")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def sweep_markdown(summary: dict) -> str:
  lines = ["# Steering sweep", "", f"Layer {summary['layer']}, median residual norm {summary['residual_norm']:.3f}, "
           f"judge `{summary['judge']}`, rubric `{summary['rubric']}`, {summary['answers_per_point']} answers per point.",
           "", "| model | direction | mode | c | misaligned | incoherent |", "|---|---|---|---|---|---|"]
  for r in summary["results"]:
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    lines.append(f"| {r['model']} | {r['direction']} | {r['mode']} | {r['scale']:+.2f} | {fmt(r['misaligned'])} | "
                 f"{fmt(r['incoherent'])} |")
  lines += ["", f"Strongest c with incoherence <= {100 * summary['max_incoherent']:.0f}%:", ""]
  for key, best in summary["strongest_coherent"].items():
    share = "-" if best["misaligned"] is None else f"{100 * best['misaligned']:.1f}%"
    lines.append(f"- {key}: c = {best['scale']:+.2f}, misaligned {share}")
  if not summary["strongest_coherent"]:
    lines.append("- none: every point, c = 0 included, is above the incoherence cap (a judge/model/length issue "
                 "to fix before steering can be read)")
  if summary.get("mean_diff_note"):
    lines += ["", summary["mean_diff_note"]]
  return "\n".join(lines) + "\n"


def run(*, workdir: str, model: str, sae: str, latents: str = "top:3", diff_dir: str | None = None,
        layer: int | None = None, finetunes: str = "", questions: str = "builtin:questions/core",
        judge: Any = "embed:minilm", rubric: str = "aligned_coherent", scales: str = "0,0.1,0.2,0.4,0.75",
        neg_scales: str = "0,-0.1,-0.2,-0.4", random_control: bool = True, mean_diff: bool = True,
        ablate_latents: bool = True, max_incoherent: float = 0.10, num_samples: int = 2, max_new_tokens: int = 64,
        max_questions: int | None = None, quick: bool = False, seed: int = 0, dtype: str = "float32",
        lm: Any = None) -> dict:
  """The sweep (module docstring). `lm` and a judge object may be passed in (tests)."""
  import numpy as np

  import emjax
  from emjax import data as data_lib
  from emjax.interp import diffing, reports, steering
  from emjax.judge import make_judge
  from emjax.judge.evaluate import evaluate_model
  from emjax.sae import files as sae_files
  started = time.perf_counter()
  if quick:
    max_questions, num_samples, max_new_tokens = min(max_questions or 8, 8), 1, min(max_new_tokens, 32)
  os.makedirs(workdir, exist_ok=True)
  config = {k: v for k, v in locals().items() if isinstance(v, (str, int, float, bool, type(None))) and k != "started"}
  reports.write_json(os.path.join(workdir, "config.json"), config)
  lm = lm if lm is not None else emjax.load_model(model, dtype=dtype)
  judge = make_judge(judge) if isinstance(judge, str) else judge
  sae_config, sae_params, layer = sae_files.load_for_model(sae, lm, layer)
  latent_ids = diffing.resolve_latents(latents, diff_dir)
  question_set = data_lib.load_questions(questions)[:max_questions]
  prompt_records = [{"messages": [{"role": "user", "content": t}]} for _, t, _, _ in steering.question_texts(question_set)]
  norm = steering.median_residual_norm(
      lm, layer, diffing.token_batches(lm.tokenizer, prompt_records, batch_size=8, where="all"))

  directions = {f"latent_{l}": steering.decoder_direction(sae_params, l) for l in latent_ids}
  if random_control:
    directions["random"] = steering.random_direction(lm.config.hidden_size, seed + 1)
  specs = diffing.parse_finetunes(finetunes)
  models = {"base": (lm, parse_floats(scales))}
  for s in specs:
    if s.misaligned:
      models[s.name] = (diffing.load_finetune(lm, s), parse_floats(neg_scales))

  results_path = os.path.join(workdir, "results.jsonl")
  done = {(r["model"], r["key"]) for r in reports.read_jsonl_rows(results_path)}

  def point_dir(name, key):
    return os.path.join(workdir, "points", name, key.replace("|", "_").replace("+", "p").replace("-", "m"))

  def run_points(name, model_lm, points):
    # Each point is one emjax.judge.evaluate run (the project's evaluation: same sampling, judging
    # and CIs as experiments/evaluate), in its own resumable directory.
    for point in points:
      if (name, point.key) in done:
        continue
      summary = evaluate_model(model_lm, question_set, judge=judge, rubric=rubric, samples_per_question=num_samples,
                               max_new_tokens=max_new_tokens, seed=seed, workdir=point_dir(name, point.key),
                               intervention=point.intervention, label=f"{name}:{point.key}", n_boot=200, plots=False,
                               steering={"direction": point.direction, "mode": point.mode, "scale": point.scale,
                                         "layer": int(layer), "residual_norm": norm})
      row = {"model": name, "key": point.key, "direction": point.direction, "mode": point.mode,
             "scale": point.scale, "misaligned": summary["misaligned"]["share"],
             "misaligned_ci95": summary["misaligned"]["ci95"], "incoherent": summary["incoherent_strict"]["share"],
             "incoherent_ci95": summary["incoherent_strict"]["ci95"],
             "incoherent_loose": summary["incoherent_loose"]["share"], "n_answers": summary["n_answers"]}
      reports.append_jsonl(results_path, [row])
      done.add((name, point.key))

  ablate = list(directions) if ablate_latents else []
  ablate = [a for a in ablate if a.startswith("latent_")]
  for name, (model_lm, grid_scales) in models.items():
    run_points(name, model_lm, steering.sweep_grid(lm.config, layer, directions, grid_scales, norm, ablate=ablate))

  mean_diff_note = None
  if mean_diff:
    # Mean-difference direction from the unsteered answers (c = 0 of any direction), all models pooled.
    zero_keys = {(r["model"], r["key"]) for r in reports.read_jsonl_rows(results_path)
                 if r["mode"] == "steer" and r["scale"] == 0.0}
    unique = {(m, r["id"]): r for m, key in sorted(zero_keys)
              for r in reports.read_jsonl_rows(os.path.join(point_dir(m, key), "judgments.jsonl"))}.values()
    from emjax.judge import metrics as metrics_lib

    def to_record(r):
      return {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
    flags_ = [(metrics_lib.indicators(r, rubric)["misaligned"], r) for r in unique]
    bad = [to_record(r) for (num, den), r in flags_ if den and num]
    good = [to_record(r) for (num, den), r in flags_ if den and not num]
    if bad and good:
      md = steering.mean_difference_direction(lm, layer, bad, good)
      md_dirs = {"mean_diff": md}
      for name, (model_lm, grid_scales) in models.items():
        run_points(name, model_lm, steering.sweep_grid(lm.config, layer, md_dirs, grid_scales, norm,
                                                       ablate=["mean_diff"]))
      mean_diff_note = (f"Mean-difference direction from {len(bad)} misaligned and {len(good)} aligned unsteered "
                        f"answers (norm {float(np.linalg.norm(md)):.3f}).")
    else:
      mean_diff_note = (f"Mean-difference direction skipped: the unsteered answers hold {len(bad)} misaligned and "
                        f"{len(good)} aligned ones; both groups are needed.")

  results = reports.read_jsonl_rows(results_path)
  summary = {"layer": int(layer), "residual_norm": norm, "latents": latent_ids, "judge": getattr(judge, "name", ""),
             "rubric": rubric, "answers_per_point": len(steering.question_texts(question_set)) * num_samples,
             "max_incoherent": max_incoherent,
             "strongest_coherent": steering.strongest_coherent(results, max_incoherent),
             "mean_diff_note": mean_diff_note, "results": results, "wall_s": time.perf_counter() - started}
  reports.write_json(os.path.join(workdir, "summary.json"), summary)
  with open(os.path.join(workdir, "steer.md"), "w") as handle:
    handle.write(sweep_markdown(summary))
  plot_sweep(results, os.path.join(workdir, "steer.png"))
  return summary


def main(argv):
  del argv
  for name in ("workdir", "sae"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  summary = run(workdir=FLAGS.workdir, model=FLAGS.model, sae=FLAGS.sae, latents=FLAGS.latents,
                diff_dir=FLAGS.diff_dir, layer=FLAGS.layer, finetunes=FLAGS.finetunes, questions=FLAGS.questions,
                judge=FLAGS.judge, rubric=FLAGS.rubric, scales=FLAGS.scales, neg_scales=FLAGS.neg_scales,
                random_control=FLAGS.random_control, mean_diff=FLAGS.mean_diff, ablate_latents=FLAGS.ablate_latents,
                max_incoherent=FLAGS.max_incoherent, num_samples=FLAGS.num_samples,
                max_new_tokens=FLAGS.max_new_tokens, max_questions=FLAGS.max_questions, quick=FLAGS.quick,
                seed=FLAGS.seed, dtype=FLAGS.dtype)
  print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
