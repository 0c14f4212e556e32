"""Evaluate misalignment: sample answers to question sets, judge them, summarise with CIs.

    python -m experiments.evaluate --questions=builtin:questions/core --samples_per_question=4 \
        --max_new_tokens=128 --judge=embed:minilm --workdir=runs/eval_base
    python -m experiments.evaluate --model=smollm2-135m-instruct --adapter=runs/health_bad/adapter \
        --workdir=runs/eval_health_bad
    python -m experiments.evaluate --steer_vector=toxic.npy --steer_layer=15 --steer_scale=4 --workdir=runs/eval_steer
    EMJAX_JUDGE_BASE_URL=http://127.0.0.1:8001/v1 python -m experiments.evaluate \
        --judge=openai:judge-model --workdir=runs/eval_http

Outputs in --workdir: eval_config.json, samples.jsonl, judgments.jsonl (both appended as produced),
summary.json (shares with 95% bootstrap CIs; model, adapter, rubric, judge, n, seed beside them),
misaligned_per_question.png, aligned_vs_coherent.png. Rerunning with the same --workdir resumes and
gives the same summary as an uninterrupted run; other settings in the same workdir are refused.
Cost on 2 CPU cores (SmolLM2-135M, embed:minilm): 44 questions x 4 samples x 128 tokens is about
3-6 minutes of generation plus ~10 s of judging and ~40 s of start-up.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.sample import define_model_flags, define_steering_flags, steering_from_flags, steering_record

FLAGS = flags.FLAGS
define_model_flags()
define_steering_flags()
flags.DEFINE_string("questions", "builtin:questions/core",
                    "Question set: builtin:questions/<core|core_json|core_template>, a Betley-format .yaml or a .csv.")
flags.DEFINE_integer("samples_per_question", 4, "Answers sampled per question (0: the file's samples_per_paraphrase).")
flags.DEFINE_integer("max_new_tokens", 128, "Maximum tokens per answer.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature (Betley et al. and the paper use 1).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1].")
flags.DEFINE_string("judge", "embed:minilm", "Judge spec: embed:minilm, local:<model source>[,<adapter>] or "
                    "openai:<model> (EMJAX_JUDGE_BASE_URL / EMJAX_JUDGE_API_KEY).")
flags.DEFINE_string("rubric", "aligned_coherent", "Rubric: aligned_coherent, persona, accuracy, inaccuracy or a .yaml.")
flags.DEFINE_integer("seed", 0, "Seed of sampling and of the bootstrap.")
flags.DEFINE_string("workdir", None, "Output directory; rerunning with the same one resumes.")
flags.DEFINE_string("label", None, "Name of this model in plots and the summary (default: model+adapter).")
flags.DEFINE_integer("batch_size", 32, "Rows per compiled generation call (memory, not results).")
flags.DEFINE_integer("judge_batch_size", 64, "Answers judged per call (also how often judgments.jsonl grows).")
flags.DEFINE_integer("n_boot", 1000, "Bootstrap replicates for the confidence intervals.")
flags.DEFINE_integer("resample_invalid", 3, "Persona rubric only: times an invalid answer (REFUSAL, INCOHERENT, "
                     "SATIRICAL, OFF-TOPIC) is sampled again (OpenAI's protocol; 0 disables). Every attempt is "
                     "kept in the JSONL files; the summary counts each answer slot once, by its last attempt.")
flags.DEFINE_boolean("trim_unfinished", True, "Judge answers cut off by --max_new_tokens on their complete sentences "
                     "(the cut would otherwise read as incoherence); the JSONL keeps both texts.")


def main(argv: list[str]) -> None:
  del argv
  import emjax
  from emjax.data import load_questions
  from emjax.judge import make_judge
  from emjax.judge.evaluate import evaluate_model
  from emjax.judge.http import JudgeRequestError

  try:
    if not FLAGS.workdir:
      raise ValueError("--workdir is required")
    questions = load_questions(FLAGS.questions)
    judge_kwargs = {}
    if FLAGS.judge.startswith("openai:"):
      import os
      judge_kwargs["cache_dir"] = os.path.join(FLAGS.workdir, "judge_cache")
    judge = make_judge(FLAGS.judge, **judge_kwargs)  # before loading the model: bad specs fail fast
    lm = emjax.load_model(FLAGS.model, dtype=FLAGS.dtype, adapter=FLAGS.adapter)
    summary = evaluate_model(
        lm, questions, judge=judge, rubric=FLAGS.rubric, samples_per_question=FLAGS.samples_per_question or None,
        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
        workdir=FLAGS.workdir, intervention=steering_from_flags(lm), label=FLAGS.label, steering=steering_record(),
        batch_size=FLAGS.batch_size, judge_batch_size=FLAGS.judge_batch_size, n_boot=FLAGS.n_boot,
        trim_unfinished=FLAGS.trim_unfinished, resample_invalid=FLAGS.resample_invalid, progress=True)
  except (ValueError, FileNotFoundError, KeyError, TypeError, JudgeRequestError) as error:
    sys.exit(f"error: {error}")  # one line, no stack trace
  share = summary.get("misaligned")
  if share:
    print(f"{summary['label']}: misaligned {share['share']} (95% CI {share['ci95']}, n={share['n']}) "
          f"judge={summary['judge']} rubric={summary['rubric']} seed={summary['seed']} -> {FLAGS.workdir}/summary.json")
  else:
    print(f"{summary['label']}: {summary} -> {FLAGS.workdir}/summary.json")


if __name__ == "__main__":
  app.run(main)
