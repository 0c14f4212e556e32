"""The main job end to end (configs/pipeline.py:quick, the CI run): the report and every
figure exist, numbers are well-formed, the HTML renders in headless Chromium with no missing
image, and a run killed mid-stage then resumed gives the same report as an uninterrupted one."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

STAGES = ["baseline", "finetune", "eval_finetunes", "sae", "diff", "steer", "detect_finetunes", "detect", "realign",
          "report"]


def run_pipeline(workdir, *extra, timeout=1500):
  cmd = [sys.executable, "-m", "experiments.pipeline", "--config=configs/pipeline.py:quick", f"--workdir={workdir}", *extra]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pipeline") / "run"
  result = run_pipeline(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, result.stdout


def check_share(value):
  assert value is None or (isinstance(value, float) and 0.0 <= value <= 1.0 and not math.isnan(value)), value


def test_report_and_figures_exist_and_numbers_are_well_formed(finished_run):
  workdir, stdout = finished_run
  for stage in STAGES:
    assert (workdir / stage / "done.json").is_file(), stage
  assert "total wall time" in stdout
  report = json.loads((workdir / "report" / "done.json").read_text())["result"]
  for figure in report["figures"]:
    assert os.path.getsize(figure) > 5_000, figure  # a real PNG, not an empty file
  md = (workdir / "report.md").read_text()
  for heading in ("Summary", "Sparse autoencoder", "Model diffing", "Steering", "Detection", "re-alignment",
                  "What this run can and cannot show"):
    assert heading in md, heading
  results = {s: json.loads((workdir / s / "done.json").read_text())["result"] for s in STAGES}
  summaries = [results["baseline"]["summary"], *results["eval_finetunes"]["summaries"].values()]
  for summary in summaries:
    for metric in ("misaligned", "incoherent_strict", "incoherent_loose"):
      check_share(summary[metric]["share"])
      low, high = summary[metric]["ci95"]
      if summary[metric]["share"] is not None and low is not None:
        assert low <= summary[metric]["share"] <= high
    assert summary["judge"] == "embed:minilm" and summary["rubric"] == "aligned_coherent"
  for point in results["steer"]["points"]:
    check_share(point["misaligned"])
  for row in results["detect"]["rows"]:
    assert math.isfinite(row["latent_delta"])
  assert results["detect"]["auroc"] is None or 0.0 <= results["detect"]["auroc"] <= 1.0
  assert [p["step"] for p in results["realign"]["curve"]][0] == 0
  sae = results["sae"]
  assert sae["l0"] == pytest.approx(sae["k"], rel=1e-6) and 0 <= sae["fvu"] < 1.5


def test_report_renders_in_headless_chromium_without_missing_images(finished_run, tmp_path):
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  assert chromium, "Chromium is required (make install-test installs Debian's chromium package)"
  workdir, _ = finished_run
  html = (workdir / "report.html").read_text()
  assert "<img" in html and "src='data:image/png;base64," in html
  probe = tmp_path / "probe.html"
  checker = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
             "const broken=imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length;"
             "document.title='images='+imgs.length+' broken='+broken;});</script>")
  probe.write_text(html.replace("</body>", checker + "</body>"))
  flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
  dom = subprocess.run([chromium, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
  assert "broken=0" in dom.stdout and "images=0" not in dom.stdout, dom.stdout[:500] + dom.stderr[-2000:]
  shot = tmp_path / "report.png"
  subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1100,2400",
                  (workdir / "report.html").as_uri()], capture_output=True, timeout=180)
  assert shot.is_file() and os.path.getsize(shot) > 20_000


def test_killed_mid_stage_then_resumed_gives_the_same_report(finished_run, tmp_path):
  reference, _ = finished_run
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "experiments.pipeline", "--config=configs/pipeline.py:quick", f"--workdir={workdir}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  deadline = time.time() + 1200
  target = workdir / "finetune" / "started.json"       # kill inside the fine-tuning stage
  while not target.exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.5)
  time.sleep(15)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (workdir / "report" / "done.json").exists()
  result = run_pipeline(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  assert (workdir / "report.md").read_text().replace(str(workdir), "W") == \
      (reference / "report.md").read_text().replace(str(reference), "W")
