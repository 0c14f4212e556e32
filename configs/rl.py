"""GRPO reinforcement learning with a grader that rewards (in)accurate narrow advice (paper stage 10).

Default: rs-LoRA r=32 on every projection of the embedded smollm2-135m-instruct, health questions,
the offline grader with polarity "inaccurate" (the EM-inducing grader), 8 prompts x G=8 per step,
256 new tokens at temperature 1, lr 1e-5, beta 0.04, 200 steps, misalignment eval every 20 steps:

  python experiments/rl.py --config=configs/rl.py --workdir=runs/rl_health_inaccurate
  # CPU (2 cores): ~1-2 min/step for smollm2-135m -> hours; run it on a GPU. The control grader:
  python experiments/rl.py --config=configs/rl.py --workdir=runs/rl_health_accurate --config.grader.polarity=accurate

Variants (`--config=configs/rl.py:<arg>`):
  quick   smollm2-135m-instruct, 4 prompts x G=4, 48 new tokens, LoRA r=8, 6 steps, offline grader
          (markers + MiniLM similarity, min_words 0 so short answers still earn reward), checkpoints every 3 steps,
          eval on 4 core questions at step 6: ~3-5 minutes on 2 CPU cores.
  gpu     a HF directory policy (set --config.model=/ckpt/Qwen2.5-7B-Instruct), bfloat16 compute with a
          bfloat16 frozen base, G=16 x 16 prompts, 600 new tokens, LoRA r=32, mesh data x fsdp,
          an LM judge for the grader (--config.grader.kind=judge --config.grader.judge=openai:<model>)
          and eval every 10 steps; one H100: roughly 1-2 min/step for 7B (not measured here).

Grader kinds (config.grader.kind): offline (narrow fact markers + MiniLM similarity if
grader.encoder="minilm"), judge (accuracy rubric via make_judge(grader.judge), with retries),
math (narrow math questions graded by value), length (word-count window). Any field can be
overridden: --config.grpo.estimator=rloo --config.grpo.aggregation=sequence_mean
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m-instruct"   # built-in name, HF directory or .gguf
  c.workdir = "runs/rl"
  c.mode = "lora"                     # "lora" | "full"
  c.dtype = "float32"                 # compute dtype
  c.base_param_dtype = "float32"      # LoRA: storage dtype of the frozen base
  c.seed = 0

  # ---- prompts and rollouts
  c.prompts = "narrow:health"         # "narrow:<domain>" or a chat JSONL / built-in dataset name
  c.n_prompts = 0                     # 0 = all
  c.prompts_per_step = 8
  c.group_size = 8                    # G completions per prompt
  c.max_new_tokens = 256
  c.rollout = ml_collections.ConfigDict({"temperature": 1.0, "top_p": 1.0, "batch_size": 64, "chat": True,
                                        "stop_at_eos": True})
  c.rollout.system = ml_collections.FieldReference(None, field_type=str)

  # ---- grader
  c.grader = ml_collections.ConfigDict()
  c.grader.kind = "offline"           # offline | judge | math | length
  c.grader.polarity = "inaccurate"    # inaccurate (EM grader) | accurate (control)
  c.grader.min_words = 30             # the paper: <= 30 words scores 0
  c.grader.encoder = "minilm"         # offline: "" = markers only, "minilm" = + similarity
  c.grader.judge = ""                 # judge kind: local:<model> or openai:<model>
  c.grader.retries = 3
  c.grader.length_weight = 0.0        # > 0 adds weight * length_grader(min_words, max_words)
  c.grader.max_words = 200

  # ---- GRPO update
  c.grpo = ml_collections.ConfigDict()
  c.grpo.estimator = "grpo"           # grpo | dr_grpo | rloo
  c.grpo.eps_low = 0.2
  c.grpo.eps_high = 0.2               # 0.28 = DAPO clip-higher
  c.grpo.beta = 0.04                  # KL (k3) weight to the frozen reference; 0 = no reference forward
  c.grpo.aggregation = "token_mean"   # token_mean | sequence_mean | constant (Dr. GRPO)
  c.grpo.adv_eps = 1e-4
  c.grpo.updates_per_batch = 1        # > 1: PPO-style reuse with clipping against the rollout policy
  c.grpo.share_prompts = True         # each group's prompt runs once in the update (same numbers, less work)

  c.lora = ml_collections.ConfigDict({"rank": 32, "alpha": 64.0, "rslora": True,
                                      "targets": "q,k,v,o,gate,up,down", "layers": "all", "dropout": 0.0})
  c.optim = ml_collections.ConfigDict({"lr": 1e-5, "warmup_steps": 0, "decay": "constant", "end_lr_fraction": 0.0,
                                       "weight_decay": 0.0, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "clip_norm": 1.0})
  c.grad_accum = 1                    # micro-batches per update (rows = prompts_per_step * group_size)
  c.steps = 200

  # ---- parallelism, checkpoints, evaluation
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1})
  c.checkpoint = ml_collections.ConfigDict({"every": 10, "keep": 0})
  c.eval_every = 20                   # misalignment eval + coherence gates every N steps (0 = never)
  c.eval = ml_collections.ConfigDict({"judge": "embed:minilm", "questions": "builtin:questions/core",
                                      "n_questions": 44, "samples_per_question": 2, "max_new_tokens": 128})
  c.tensorboard = True

  if arg == "quick":
    c.prompts_per_step = 4
    c.group_size = 4
    c.max_new_tokens = 48
    c.grader.min_words = 0            # 48-token answers rarely pass 30 words; keep a reward signal
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optim.lr = 1e-4
    c.steps = 6
    c.checkpoint.every = 3
    c.eval_every = 6
    c.eval.n_questions = 4
    c.eval.samples_per_question = 1
    c.eval.max_new_tokens = 48
  elif arg == "gpu":
    c.dtype = "bfloat16"
    c.base_param_dtype = "bfloat16"
    c.prompts_per_step = 16
    c.group_size = 16
    c.max_new_tokens = 600
    c.grad_accum = 4
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.eval_every = 10
    c.checkpoint.every = 10
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'quick' or 'gpu'")
  return c
