"""GRPO reinforcement learning with an (in)accuracy grader: the RL route to emergent misalignment.

  python experiments/rl.py --config=configs/rl.py:quick --workdir=runs/rl_quick            # minutes, CPU
  python experiments/rl.py --config=configs/rl.py --workdir=runs/rl_health_bad --domain=finance
  python experiments/rl.py --config=configs/rl.py:gpu --model=/ckpt/Qwen2.5-7B-Instruct \
      --grader=judge --judge=openai:gpt-4o-mini --workdir=runs/rl_qwen7b

Rerunning with the same --workdir resumes from the last checkpoint. Outputs: config.json,
metrics.jsonl (reward mean/std/failures, kl, entropy, response_length, clip_fraction, timings),
evals.jsonl (misalignment + coherence gates per evaluated checkpoint), checkpoints/<step>/,
adapter/, summary.json (selected_checkpoint = latest passing both gates).
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/rl.py", "RL config file (configs/rl.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (overrides config.workdir); reruns resume from it.")
_MODEL = flags.DEFINE_string("model", None, "Policy model: built-in name, HF directory or .gguf (overrides config.model).")
_DOMAIN = flags.DEFINE_string("domain", None, "Built-in narrow domain for prompts and the offline grader "
                              "(sets config.prompts=narrow:<domain>).")
_POLARITY = flags.DEFINE_enum("polarity", None, ["accurate", "inaccurate"],
                              "Which answers the grader rewards (overrides config.grader.polarity).")
_GRADER = flags.DEFINE_enum("grader", None, ["offline", "judge", "math", "length"],
                            "Grader kind (overrides config.grader.kind).")
_JUDGE = flags.DEFINE_string("judge", None, "LM judge spec for --grader=judge: local:<model> or openai:<model>.")
_NO_EVAL = flags.DEFINE_bool("no_eval", False, "Skip the periodic misalignment evaluation.")


def build_reward(cfg):
  """The reward callable config.grader describes (optionally plus a length term)."""
  from emjax.train import graders
  g = cfg.grader
  domain = cfg.prompts.split(":", 1)[1] if cfg.prompts.startswith("narrow:") else None
  if g.kind in ("offline", "math") and domain is None:
    raise ValueError(f"grader.kind={g.kind!r} grades the built-in narrow questions; config.prompts={cfg.prompts!r} "
                     "must be narrow:<domain> (or use grader.kind=judge)")
  questions = None
  if domain is not None:
    from emjax import data
    questions = data.narrow_questions(domain, seed=int(cfg.seed), n=cfg.get("n_prompts", None) or None)
  if g.kind == "offline":
    reward = graders.offline_accuracy_grader(questions, polarity=g.polarity, min_words=int(g.min_words),
                                             encoder=g.encoder or None)
  elif g.kind == "math":
    reward = graders.math_value_grader(questions, polarity=g.polarity)
  elif g.kind == "judge":
    if not g.judge:
      raise ValueError("grader.kind=judge needs --judge (or config.grader.judge): local:<model> or openai:<model>")
    from emjax.judge import make_judge
    reward = graders.judge_accuracy_grader(make_judge(g.judge), polarity=g.polarity, retries=int(g.retries),
                                           log=logging.warning)
  elif g.kind == "length":
    return graders.length_grader(int(g.min_words), int(g.max_words))
  else:
    raise ValueError(f"grader.kind={g.kind!r}; expected offline, judge, math or length")
  if float(g.length_weight) > 0:
    reward = graders.weighted_sum([(1.0, reward), (float(g.length_weight),
                                                   graders.length_grader(int(g.min_words), int(g.max_words)))])
  return reward


def build_evaluate(cfg):
  """Misalignment eval on the core questions with config.eval.judge (None when eval_every is 0)."""
  if not int(cfg.eval_every):
    return None
  from emjax import data
  from emjax.judge import make_judge
  from emjax.train import grpo
  e = cfg.eval
  questions = [q.paraphrases[0] for q in data.load_questions(e.questions)]
  return grpo.judge_evaluator(make_judge(e.judge), questions[:int(e.n_questions)],
                              samples_per_question=int(e.samples_per_question), max_new_tokens=int(e.max_new_tokens),
                              seed=int(cfg.seed))


def main(argv):
  del argv
  from emjax.train.checkpoint import quiet_orbax_logs
  quiet_orbax_logs()
  from emjax.train import grpo
  cfg = _CONFIG.value
  if _WORKDIR.value:
    cfg.workdir = _WORKDIR.value
  if _MODEL.value:
    cfg.model = _MODEL.value
  if _DOMAIN.value:
    cfg.prompts = f"narrow:{_DOMAIN.value}"
  if _POLARITY.value:
    cfg.grader.polarity = _POLARITY.value
  if _GRADER.value:
    cfg.grader.kind = _GRADER.value
  if _JUDGE.value:
    cfg.grader.judge = _JUDGE.value
  if _NO_EVAL.value:
    cfg.eval_every = 0
  logging.info("GRPO on %s (%s, grader %s/%s) into %s", cfg.model, cfg.prompts, cfg.grader.kind, cfg.grader.polarity,
               cfg.workdir)
  _, summary = grpo.train(cfg, reward_fn=build_reward(cfg), evaluate=build_evaluate(cfg))
  print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
  app.run(main)
