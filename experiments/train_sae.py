"""Train a TopK SAE on one layer's residual stream: harvest -> cache -> train -> save -> eval.

    python -m experiments.train_sae --config=configs/sae.py:quick --workdir=runs/sae_quick

Writes into --workdir: config.json, activations/ (unless --config.cache_dir is shared),
checkpoints/, metrics.jsonl, tensorboard/, sae/ (SAELens layout), density.png, summary.json.
Rerunning with the same workdir reuses the cache and resumes training.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from emjax.sae import pipeline as sae_pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/sae.py", "ml_collections config file (configs/sae.py[:quick|:paper])."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; rerunning resumes.", required=True)


def main(argv):
    del argv
    from emjax.train.checkpoint import quiet_orbax_logs
    quiet_orbax_logs()
    import emjax

    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as handle:
        handle.write(cfg.to_json_best_effort(indent=2))

    lm = emjax.load_model(cfg.model)
    summary = sae_pipeline.train_on_model(lm, workdir, cfg)
    logging.info("summary: %s", json.dumps(summary))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
