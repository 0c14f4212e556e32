r"""The main job: the emergent-misalignment story end to end, as cached, resumable stages.

  python -m experiments.pipeline --config=configs/pipeline.py --workdir=runs/demo      # = make demo
  python -m experiments.pipeline --config=configs/pipeline.py:quick --workdir=runs/quick
  python -m experiments.pipeline --config=configs/pipeline.py --workdir=runs/demo --stages=steer,report

Stages: baseline, finetune, eval_finetunes, sae, diff, steer, detect_finetunes, detect, realign,
report. Rerunning with the same workdir skips finished stages and resumes an interrupted one; a
changed config reruns only the stages that read the changed sections (and what follows from
them). The report is <workdir>/report.md and <workdir>/report.html.
"""

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pipeline.py", "Pipeline config file (and :variant).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Output folder; rerunning with the same one resumes.")
_STAGES = flags.DEFINE_list("stages", [], "Only these stages (comma-separated); others are read from the "
                            "workdir's cache. Empty: all stages.")
_JUDGE = flags.DEFINE_string("judge", None, "Judge spec overriding the config's (embed:minilm, local:<model>, "
                             "openai:<model>).")


def main(argv):
  del argv
  from emjax.train.checkpoint import quiet_orbax_logs
  quiet_orbax_logs()
  from emjax.pipeline import em
  from emjax.pipeline.runner import run_stages, write_json
  config = _CONFIG.value
  if _JUDGE.value:
    config.judge = _JUDGE.value
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  start = time.perf_counter()
  results = run_stages(em.stages(), config, workdir, only=_STAGES.value or None)
  report = results.get("report", {}).get("report")
  if report:
    print(f"report: {report['markdown']} and {report['html']}")
  print(f"total wall time: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
  app.run(main)
