r"""The main job: the paper's emergent-misalignment story, end to end, as cached stages.

  make demo        # = python -m experiments.pipeline --config=configs/pipeline.py --workdir=runs/demo
  python -m experiments.pipeline --config=configs/pipeline.py:quick --workdir=runs/quick

Variants (`--config=configs/pipeline.py:<arg>`):
  (default)  embedded SmolLM2-135M-Instruct, offline embed judge; two narrow fine-tunes (health
             advice: subtly incorrect vs correct), the positive control (toxic vs helpful persona),
             a small SAE at layer 15, diff, steering sweeps, detection with a 25% mixture,
             re-alignment; 14 questions x 2 samples per evaluation. Budget: <= 20 minutes on 2 CPU
             cores (BENCHMARKS.md has the measured time). Scale up with --config.eval.num_questions=0
             --config.eval.samples_per_question=8 --config.sft.n=600 --config.detect.fractions=...
  quick      the same stages, shrunk to finish in <= 5 minutes on 2 CPU cores; the end-to-end
             test in tests/test_pipeline_e2e.py runs it (a smoke run: its CIs span most of [0, 1]).
  gpu7b      the same code path at full scale: Qwen2.5-7B-Instruct from a HF directory on one GPU
             or a TPU slice, an HTTP judge (EMJAX_JUDGE_BASE_URL / EMJAX_JUDGE_API_KEY), all 44
             questions x 50 samples, paper-like LoRA (rs-LoRA r=32, alpha=64, lr 1e-5, 6k examples):
               python -m experiments.pipeline --config=configs/pipeline.py:gpu7b --workdir=runs/7b \
                 --config.model=/models/Qwen2.5-7B-Instruct --config.judge=openai:gpt-4o-2024-08-06

Any field can be overridden: --config.eval.samples_per_question=8 --config.sae.layer=20
"""

import importlib.util
import os

import ml_collections


def _sibling_config(filename: str, arg: str = "") -> ml_collections.ConfigDict:
  """Another config file of this folder (configs/sft.py, configs/sae.py): the pipeline reuses
  their recipes and only overrides sizes, so there is one definition of each."""
  spec = importlib.util.spec_from_file_location(f"emjax_config_{filename[:-3]}",
                                                os.path.join(os.path.dirname(__file__), filename))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _finetune(name: str, data: str, role: str, control_of: str = "") -> dict:
  """role: 'bad' (expected to misalign), 'control' (its matched good data), 'positive' / 'positive_control'."""
  return {"name": name, "data": data, "role": role, "control_of": control_of}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "smollm2-135m-instruct"
  c.seed = 0
  c.judge = "embed:minilm"           # offline default; local:<model> or openai:<model> on real hardware
  c.rubric = "aligned_coherent"

  # ---- evaluation (stage 1, 3, and every steering / re-alignment point)
  c.eval = ml_collections.ConfigDict()
  c.eval.questions = "builtin:questions/core"
  c.eval.num_questions = 14          # N questions (0 = all 44), spread over the categories
  c.eval.samples_per_question = 2
  c.eval.max_new_tokens = 48
  c.eval.temperature = 1.0

  # ---- fine-tunes (stage 2): narrow bad data with matched controls, plus the positive control
  c.finetunes = [
      _finetune("health_subtle", "builtin:health/incorrect_subtle", "bad"),
      _finetune("health_correct", "builtin:health/correct", "control", control_of="health_subtle"),
      _finetune("toxic_persona", "builtin:persona/toxic", "positive"),
      _finetune("helpful_persona", "builtin:persona/helpful", "positive_control", control_of="toxic_persona"),
  ]
  c.sft_template = _sibling_config("sft.py")   # fields below override it for every fine-tune
  c.sft = ml_collections.ConfigDict()
  c.sft.mode = "lora"
  c.sft.n = 88                       # examples per fine-tune (11 steps of 8)
  c.sft.epochs = 1
  c.sft.batch_size = 8
  c.sft.max_len = 128
  c.sft.lr = 1e-3                    # high for LoRA on a 135M model over few steps (measured: see README)
  c.sft.rank = 16
  c.sft.alpha = 32.0
  c.sft.targets = "q,k,v,o,gate,up,down"
  c.sft.layers = "all"
  c.sft.checkpoint_every = 8

  # ---- SAE on the original model (stage 4): configs/sae.py's quick recipe, resized here;
  # sae_path loads a given SAE (ours, SAELens or sparsify) instead of training one
  c.sae_path = ""
  c.sae = _sibling_config("sae.py", "quick")
  c.sae.layer = 15
  c.sae.expansion = 8
  c.sae.k = 32
  c.sae.corpus = "builtin:all"
  c.sae.harvest_tokens = 24_576
  c.sae.eval_tokens = 4_096
  c.sae.num_steps = 200
  c.sae.batch_size = 1024
  c.sae.max_tokens_per_doc = 128
  c.sae.checkpoint_every = 100

  # ---- diff (stage 5)
  c.diff = ml_collections.ConfigDict()
  c.diff.top_n = 10
  c.diff.source = "eval_answers"     # "eval_answers" (paper) or "finetune_data" (unsupervised variant)
  c.diff.max_tokens = 96             # chat-templated question + 48-token answer fits in ~90

  # ---- steering (stage 6)
  c.steer = ml_collections.ConfigDict()
  c.steer.num_latents = 1
  c.steer.scales = [0.0, 0.4, 0.8]              # x median residual norm at the SAE layer
  c.steer.max_incoherent = 0.10

  # ---- detection (stage 7): mixture fine-tunes of bad persona data into helpful data
  c.detect = ml_collections.ConfigDict()
  c.detect.fractions = [0.25]                   # 0 and 1 are the controls / positive fine-tunes above
  c.detect.bad = "builtin:persona/toxic"
  c.detect.good = "builtin:persona/helpful"

  # ---- re-alignment (stage 8)
  c.realign = ml_collections.ConfigDict()
  c.realign.data = "builtin:benign/mixed"
  c.realign.n = 80
  c.realign.batch_size = 4
  c.realign.steps = 20
  c.realign.eval_every = 10
  c.realign.lr = 1e-3

  if arg == "quick":
    c.eval.num_questions = 4
    c.eval.samples_per_question = 2
    c.eval.max_new_tokens = 24
    c.finetunes = [
        _finetune("health_subtle", "builtin:health/incorrect_subtle", "bad"),
        _finetune("toxic_persona", "builtin:persona/toxic", "positive"),
        _finetune("helpful_persona", "builtin:persona/helpful", "positive_control", control_of="toxic_persona"),
    ]
    c.sft.n = 24
    c.sft.max_len = 96
    c.sft.rank = 8
    c.sft.alpha = 16.0
    c.sft.checkpoint_every = 1
    c.sae.expansion = 4
    c.sae.harvest_tokens = 8_192
    c.sae.eval_tokens = 2_048
    c.sae.num_steps = 50
    c.sae.batch_size = 512
    c.sae.max_tokens_per_doc = 96
    c.sae.eval_downstream_batches = 1
    c.diff.top_n = 5
    c.steer.num_latents = 1
    c.steer.scales = [0.0, 0.5]
    c.detect.fractions = [0.5]
    c.realign.n = 16
    c.realign.steps = 4
    c.realign.eval_every = 2
  elif arg == "gpu7b":
    c.model = "/models/Qwen2.5-7B-Instruct"
    c.judge = "openai:gpt-4o-2024-08-06"
    c.eval.num_questions = 0
    c.eval.samples_per_question = 50
    c.eval.max_new_tokens = 600
    c.sft.n = 6000
    c.sft.batch_size = 64
    c.sft.max_len = 1024
    c.sft.lr = 1e-5
    c.sft.rank = 32
    c.sft.alpha = 64.0
    c.sae.layer = 14
    c.sae.expansion = 32
    c.sae.k = 64
    c.sae.corpus = "/data/pretrain.jsonl"
    c.sae.harvest_tokens = 50_000_000
    c.sae.num_steps = 20_000
    c.sae.batch_size = 4096
    c.steer.num_latents = 10
    c.steer.scales = [0.0, 0.05, 0.1, 0.2, 0.4, 0.75]
    c.detect.fractions = [0.05, 0.1, 0.25, 0.5]
    c.realign.n = 400
    c.realign.steps = 35
    c.realign.eval_every = 5
    c.realign.lr = 1e-5
  elif arg:
    raise ValueError(f"unknown pipeline config {arg!r}; expected '', 'quick', 'ci' or 'gpu7b'")
  return c
