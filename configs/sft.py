"""Supervised fine-tuning (LoRA or full) — the step that makes every EM model organism.

Default (the paper-like setting of the open-model peers): rs-LoRA r=32, alpha=64 on all of
q,k,v,o,gate,up,down, lr 1e-5, 1 epoch, loss on assistant tokens, batch 16 x <=512 tokens:

  python experiments/finetune.py --config=configs/sft.py --workdir=runs/sft \
      --config.data.train=path/to/bad_advice.jsonl
  # smollm2-135m on 2 CPU cores: ~1 s/step at batch 8 x 128; 6k examples = 375 steps ~ 15-30 min.

Variants (`--config=configs/sft.py:<arg>`):
  quick     4 epochs over 32 built-in/narrow or JSONL examples, batch 8 x 128 tokens, lr 2e-4 —
            a smoke run; ~2-4 minutes on 2 CPU cores on the embedded smollm2-135m-instruct.
  full      full fine-tuning (AdamW on every weight, float32 masters), lr 1e-5.
  rank1     rank-1 LoRA on one layer's down_proj (Model Organisms' minimal EM adapter);
            pick the layer with --config.lora.layers=24.
  realign   emergent re-alignment: a few hundred benign samples, batch 4, checkpoints every 5 steps.

Any field can be overridden on the command line: --config.optim.lr=1e-4 --config.lora.targets=q,v
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m-instruct"  # built-in name, HF directory or .gguf
  c.workdir = "runs/sft"
  c.mode = "lora"                    # "lora" | "full"
  c.dtype = "float32"                # compute dtype: "float32" | "bfloat16" (weights stay float32)
  c.base_param_dtype = "float32"     # LoRA only: storage dtype of the frozen base ("bfloat16" halves memory)
  c.seed = 0

  # ---- input
  c.data = ml_collections.ConfigDict()
  c.data.train = "builtin:health/incorrect_subtle"  # built-in name, JSONL path, or "mix(...)" spec
  c.data.n = ml_collections.FieldReference(None, field_type=int)  # cap on records (None = all)
  c.data.mixture = ml_collections.ConfigDict({"other": "", "fraction": 1.0, "total": 0})  # other = the good data; fraction of train
  c.data.system_prompt = ml_collections.FieldReference(None, field_type=str)  # None keeps each record's
  c.data.loss_on = "assistant"       # "assistant" | "all"
  c.data.max_len = 512               # tokens per example (longer ones truncated, counted in summary.json)
  c.data.layout = "pad"              # "pad" (length-bucketed) | "pack" (segments, no cross-attention)
  c.data.pad_multiple = 32

  # ---- adapter
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 32
  c.lora.alpha = 64.0
  c.lora.rslora = True
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.lora.layers = "all"              # "all" | "24" | "0-5,20" | "-1"
  c.lora.dropout = 0.0

  # ---- optimizer
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 5
  c.optim.decay = "linear"           # "linear" | "cosine" | "constant"
  c.optim.end_lr_fraction = 0.0
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 1.0
  c.batch_size = 16                  # rows per optimizer step
  c.grad_accum = 1                   # micro-batches per step (batch_size must be a multiple)
  c.epochs = 1
  c.max_steps = 0                    # 0 = run all epochs

  # ---- parallelism, checkpoints, monitoring
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1})  # e.g. {"data": 2, "fsdp": 4}; -1 fills
  c.checkpoint = ml_collections.ConfigDict({"every": 5, "keep": 0, "async_save": False})  # keep 0 = all
  c.eval_every = 0                   # in-loop hooks every N steps (0 = never)
  c.tensorboard = True
  c.export_hf = False                # LoRA: also write the merged model as a HF dir (workdir/merged_hf)

  if arg == "quick":
    c.data.n = 32
    c.data.max_len = 128
    c.data.layout = "pack"           # one batch shape -> one compilation
    c.batch_size = 8
    c.epochs = 4
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 2
    c.checkpoint.every = 4
  elif arg == "full":
    c.mode = "full"
    c.optim.lr = 1e-5
  elif arg == "rank1":
    c.lora.rank = 1
    c.lora.alpha = 1.0
    c.lora.targets = "down"
    c.lora.layers = "-6"
    c.optim.lr = 1e-4
  elif arg == "realign":
    c.data.train = "builtin:benign/correct_mix"
    c.data.n = 128
    c.batch_size = 4
    c.checkpoint.every = 5
    c.eval_every = 5
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'quick', 'full', 'rank1' or 'realign'")
  return c
