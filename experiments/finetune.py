"""Fine-tune a chat model (LoRA or full SFT) from an ml_collections config.

  python experiments/finetune.py --config=configs/sft.py:quick --workdir=runs/sft_quick
  python experiments/finetune.py --config=configs/sft.py --workdir=runs/health_bad \
      --config.data.train=builtin:health/incorrect_subtle --config.data.n=6000
  python experiments/finetune.py --config=configs/sft.py:full --workdir=runs/full --config.model=/ckpt/Qwen2.5-0.5B-Instruct

Rerunning with the same --workdir resumes from the last checkpoint. Outputs in the workdir:
config.json, metrics.jsonl, tb/, checkpoints/<step>/, adapter/ (LoRA; load with
`emjax.load_model(base, adapter=...)` or any binary's --adapter), merged_hf/ or model_hf/,
summary.json.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sft.py", "SFT config file (configs/sft.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (overrides config.workdir); reruns resume from it.")
_MODEL = flags.DEFINE_string("model", None, "Base model: built-in name, HF directory or .gguf (overrides config.model).")
_DATA = flags.DEFINE_string("data", None, "Training data: built-in name, JSONL path or mix(...) spec "
                            "(overrides config.data.train).")
_EXPORT_HF = flags.DEFINE_bool("export_hf", None, "Also write the merged model as a HF directory (LoRA runs).")


def main(argv):
  del argv
  from emjax.train.checkpoint import quiet_orbax_logs
  quiet_orbax_logs()
  from emjax.train import sft
  cfg = _CONFIG.value
  if _WORKDIR.value:
    cfg.workdir = _WORKDIR.value
  if _MODEL.value:
    cfg.model = _MODEL.value
  if _DATA.value:
    cfg.data.train = _DATA.value
  if _EXPORT_HF.value is not None:
    cfg.export_hf = _EXPORT_HF.value
  logging.info("fine-tuning %s (%s) into %s", cfg.model, cfg.mode, cfg.workdir)
  _, summary = sft.train(cfg)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  app.run(main)
