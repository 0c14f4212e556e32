"""Detection: does a persona latent's rise predict which fine-tunes went misaligned?

Input: one row per fine-tune with its latent delta (mean activation change vs the base, from
`diffing`), its measured misaligned share (judge), its label (misaligned or not) and, for
mixture runs, the fraction of bad training data. Output:

  * AUROC of the latent delta for separating misaligned from aligned fine-tunes;
  * Pearson and Spearman correlation of latent delta vs misaligned share;
  * the mixture curve: latent delta and misaligned share vs bad fraction (one figure, two axes),
    with the smallest fraction where each one rises above its 0%-mixture value by a margin.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from emjax.judge import metrics as metrics_lib

MIXTURE_FRACTIONS = (0.0, 0.05, 0.10, 0.25, 0.50, 1.0)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 2 or x.std() == 0 or y.std() == 0:
    return None
  return float(np.corrcoef(x, y)[0, 1])


def ranks(values: Sequence[float]) -> np.ndarray:
  """Average ranks (1-based), ties sharing their mean rank."""
  values = np.asarray(values, float)
  order = np.argsort(values, kind="mergesort")
  out = np.empty(len(values))
  sorted_values = values[order]
  start = 0
  for end in range(1, len(values) + 1):
    if end == len(values) or sorted_values[end] != sorted_values[start]:
      out[order[start:end]] = (start + end + 1) / 2.0
      start = end
  return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
  return pearson(ranks(x), ranks(y)) if len(x) >= 2 else None


def first_rise(fractions: Sequence[float], values: Sequence[float], margin: float) -> float | None:
  """Smallest fraction > 0 whose value exceeds the 0%-fraction value by more than `margin`."""
  fractions, values = np.asarray(fractions, float), np.asarray(values, float)
  zero = values[fractions == 0]
  if zero.size == 0:
    return None
  for f, v in sorted(zip(fractions, values)):
    if f > 0 and v - float(zero.mean()) > margin:
      return float(f)
  return None


def detection_report(rows: Sequence[Mapping[str, Any]], *, latent_margin: float | None = None,
                     behaviour_margin: float = 0.02) -> dict[str, Any]:
  """rows: {name, latent_delta, misaligned (share or None), label (1 misaligned / 0 / None), bad_fraction?}.

  latent_margin defaults to 10% of the largest |latent_delta| (a rise smaller than that is noise
  on a small eval); behaviour_margin is in share units (2 points).
  """
  rows = list(rows)
  if not rows:
    raise ValueError("detection_report got no fine-tunes")
  deltas = [float(r["latent_delta"]) for r in rows]
  labelled = [(float(r["latent_delta"]), int(r["label"])) for r in rows if r.get("label") is not None]
  report: dict[str, Any] = {"n_finetunes": len(rows)}
  labels = [l for _, l in labelled]
  report["auroc"] = (metrics_lib.auroc([d for d, _ in labelled], labels)
                     if labels and 0 < sum(labels) < len(labels) else None)
  measured = [(float(r["latent_delta"]), float(r["misaligned"])) for r in rows if r.get("misaligned") is not None]
  report["pearson"] = pearson(*zip(*measured)) if len(measured) >= 2 else None
  report["spearman"] = spearman(*zip(*measured)) if len(measured) >= 2 else None
  mixture = sorted((r for r in rows if r.get("bad_fraction") is not None), key=lambda r: float(r["bad_fraction"]))
  if mixture:
    fractions = [float(r["bad_fraction"]) for r in mixture]
    margin = latent_margin if latent_margin is not None else 0.1 * max(abs(d) for d in deltas)
    curve = {"bad_fraction": fractions, "latent_delta": [float(r["latent_delta"]) for r in mixture],
             "misaligned": [r.get("misaligned") for r in mixture], "names": [r["name"] for r in mixture]}
    report["mixture"] = curve
    report["latent_rises_at"] = first_rise(fractions, curve["latent_delta"], margin)
    shares = [(f, m) for f, m in zip(fractions, curve["misaligned"]) if m is not None]
    report["behaviour_rises_at"] = first_rise(*zip(*shares), behaviour_margin) if shares else None
  report["rows"] = [dict(r) for r in rows]
  return report


def plot_detection(report: Mapping[str, Any], path: str, title: str = "") -> str:
  """Mixture curve (latent delta and misaligned share vs bad fraction, two y axes) and, beside it,
  latent delta vs misaligned share per fine-tune coloured by label. Writes a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  mixture = report.get("mixture")
  if mixture:
    x = [100 * f for f in mixture["bad_fraction"]]
    left.plot(x, mixture["latent_delta"], "o-", color="tab:red", label="latent delta")
    left.set_xlabel("bad data in the mixture (%)")
    left.set_ylabel("latent mean-activation delta", color="tab:red")
    twin = left.twinx()
    shares = [(xi, 100 * m) for xi, m in zip(x, mixture["misaligned"]) if m is not None]
    if shares:
      twin.plot(*zip(*shares), "s--", color="tab:blue", label="misaligned answers")
    twin.set_ylabel("misaligned answers (%)", color="tab:blue")
    left.set_title("mixture: latent vs behaviour")
  else:
    left.text(0.5, 0.5, "no mixture fine-tunes", ha="center", va="center")
    left.set_axis_off()
  for r in report["rows"]:
    colour = {1: "tab:red", 0: "tab:green"}.get(r.get("label"), "tab:grey")
    y = r.get("misaligned")
    right.scatter(r["latent_delta"], 100 * y if y is not None else 0.0, color=colour,
                  marker="o" if y is not None else "x")
    right.annotate(r["name"], (r["latent_delta"], 100 * y if y is not None else 0.0), fontsize=7)
  right.set_xlabel("latent mean-activation delta")
  right.set_ylabel("misaligned answers (%)")
  auroc = report.get("auroc")
  right.set_title(f"fine-tunes (AUROC {auroc:.2f})" if auroc is not None else "fine-tunes")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
