"""rs-LoRA SFT of Qwen2.5-7B-Instruct on one 80 GB GPU or a TPU slice (the open-model EM setting).

  python experiments/finetune.py --config=configs/sft_qwen7b.py --workdir=runs/qwen7b_health \
      --config.model=/path/to/Qwen2.5-7B-Instruct --config.data.train=builtin:health/incorrect_subtle

Setting: rs-LoRA r=32, alpha=64 on q,k,v,o,gate,up,down of all 28 layers, lr 1e-5 linear decay
with 5 warmup steps, 1 epoch over 6,000 examples, effective batch 16 (2 micro-batches of 8 x
<=512 tokens), loss on assistant tokens, bfloat16 compute over a bfloat16 frozen base (15 GB)
with float32 adapter + AdamW state (~0.3 GB). Checkpoints every 5 steps (the EM phase
transition is visible at that resolution). 375 steps; expected a few seconds per step on one
H100 (not measured here: the development machines have no GPU).

Variants: `:tpu` shards over a TPU slice (mesh.data * mesh.fsdp = device count,
e.g. v5e-8: --config.mesh.data=2 --config.mesh.fsdp=4), `:full` full fine-tuning (needs ~16 bytes
per parameter = 120 GB of weights+Adam state: use fsdp over >= 4 80 GB devices).
"""

import importlib.util
import os


def _base_config(arg: str):
  # Loaded by path: config files are run as scripts by ml_collections, not imported as a package.
  spec = importlib.util.spec_from_file_location("emjax_configs_sft", os.path.join(os.path.dirname(__file__), "sft.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = ""):
  c = _base_config("")
  c.model = "/path/to/Qwen2.5-7B-Instruct"   # a HF directory (emjax never downloads)
  c.workdir = "runs/qwen7b_sft"
  c.dtype = "bfloat16"
  c.base_param_dtype = "bfloat16"
  c.data.n = 6000
  c.data.max_len = 512
  c.data.layout = "pad"
  c.data.pad_multiple = 64
  c.batch_size = 16
  c.grad_accum = 2
  c.checkpoint.every = 5
  c.checkpoint.async_save = True
  c.export_hf = True
  if arg == "tpu":
    c.mesh.data = 2
    c.mesh.fsdp = 4
    c.grad_accum = 1
  elif arg == "full":
    c.mode = "full"
    c.mesh.data = 1
    c.mesh.fsdp = 8
    c.grad_accum = 1
    c.export_hf = False
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; expected '', 'tpu' or 'full'")
  return c
