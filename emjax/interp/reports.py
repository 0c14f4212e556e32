"""Latent reports: what is each top latent? (contexts, logit lens, activation per fine-tune)

For each latent:
  * top-activating contexts from a corpus: the tokens where it fires hardest, with a window of
    text around each and the activating token marked as [[token]];
  * logit lens of its decoder direction: through the final RMSNorm and the unembedding, the
    tokens it promotes most and suppresses most;
  * its mean activation on the base and on each fine-tune (from a diff's `LatentStats`).

Written as JSON (everything), a markdown page (for people) and a grouped bar chart PNG.
"""

from __future__ import annotations

import heapq
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from emjax.interp import audit, diffing
from emjax.models import transformer
from emjax.sae import sae as sae_lib

MARK = ("[[", "]]")


def logit_lens(lm: Any, direction: np.ndarray, top: int = 10) -> dict[str, list[dict[str, Any]]]:
  """Most promoted / suppressed tokens of a residual direction [D] (final norm, then unembedding)."""
  weights = lm.weights()
  normed = np.asarray(transformer.rms_norm(np.asarray(direction, np.float32)[None], weights["final_norm"],
                                           lm.config.rms_norm_eps))[0]                # [D]
  head = weights["embed"].T if lm.config.tie_embeddings else weights["lm_head"]      # [D, V]
  logits = normed @ head                                                              # [V]
  order = np.argsort(-logits, kind="stable")

  def tokens(ids):
    return [{"token_id": int(i), "token": lm.tokenizer.decode([int(i)], skip_special=False) if lm.tokenizer else str(i),
             "logit": float(logits[i])} for i in ids]
  return {"promoted": tokens(order[:top]), "suppressed": tokens(order[::-1][:top])}


def top_contexts(lm: Any, sae_config: sae_lib.SAEConfig, sae_params: sae_lib.SAEParams, layer: int,
                 records: Sequence[Any], latents: Sequence[int], *, top: int = 5, window: int = 12,
                 where: str = "all", batch_size: int = 8, max_tokens: int = 128) -> dict[int, list[dict[str, Any]]]:
  """{latent: [{activation, record, position, text}]}, strongest first; one token per record at most."""
  heaps: dict[int, list] = {int(l): [] for l in latents}
  kept_ids: dict[int, np.ndarray] = {}
  for ids, mask, weights, index in diffing.token_batches(lm.tokenizer, records, batch_size=batch_size,
                                                         max_tokens=max_tokens, where=where):
    acts = audit.latent_acts(lm, sae_config, sae_params, layer, latents, ids, mask)  # [B, T, K]
    acts = np.where(weights[..., None] > 0, acts, 0.0)
    for row, record_index in enumerate(index):
      for k, latent in enumerate(latents):
        position = int(np.argmax(acts[row, :, k]))
        value = float(acts[row, position, k])
        if value <= 0:
          continue
        item = (value, -record_index, position)
        heap = heaps[int(latent)]
        if len(heap) < 3 * top:   # spare room: identical texts from repeated records are merged below
          heapq.heappush(heap, item)
        elif item > heap[0]:
          heapq.heapreplace(heap, item)
        else:
          continue
        kept_ids[record_index] = ids[row][mask[row]]
  out = {}
  for latent, heap in heaps.items():
    rows, seen = [], set()
    for value, neg_index, position in sorted(heap, reverse=True):
      ids = kept_ids[-neg_index]
      lo, hi = max(0, position - window), min(len(ids), position + 3)
      decode = lambda part: lm.tokenizer.decode([int(t) for t in part], skip_special=False)
      text = decode(ids[lo:position]) + MARK[0] + decode(ids[position:position + 1]) + MARK[1] + decode(ids[position + 1:hi])
      if text in seen:
        continue
      seen.add(text)
      rows.append({"activation": value, "record": -neg_index, "position": position, "text": text})
    out[latent] = rows[:top]
  return out


def latent_report(lm: Any, sae_config: sae_lib.SAEConfig, sae_params: sae_lib.SAEParams, layer: int,
                  ranking: Mapping[str, Any], stats: diffing.LatentStats | None = None, *,
                  corpus: Sequence[Any] = (), top_n: int = 10, contexts: int = 5, lens_top: int = 10) -> dict[str, Any]:
  """The report for the top-`top_n` increased latents and top-`top_n` decreased ones."""
  sections = {}
  # one pass over the corpus for the latents of both lists
  wanted = list(dict.fromkeys(e["latent"] for kind in ("increased", "decreased") for e in ranking[kind][:top_n]))
  ctx = top_contexts(lm, sae_config, sae_params, layer, corpus, wanted, top=contexts) if corpus and wanted else {}
  for kind in ("increased", "decreased"):
    entries = ranking[kind][:top_n]
    items = []
    for e in entries:
      latent = e["latent"]
      item = {"latent": latent, "score": e["score"], "delta_per_finetune": e["per_finetune"],
              "logit_lens": logit_lens(lm, np.asarray(sae_params.decoder_w[latent]), lens_top),
              "contexts": ctx.get(latent, [])}
      if stats is not None:
        item["mean_act"] = {n: float(stats.mean_act[i, latent]) for i, n in enumerate(stats.names)}
        item["fire_rate"] = {n: float(stats.fire_rate[i, latent]) for i, n in enumerate(stats.names)}
      items.append(item)
    sections[kind] = items
  return {"layer": int(layer), "n_latents": sae_config.n_latents, **sections}


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", "⏎")


def report_markdown(report: Mapping[str, Any], title: str = "Latent report") -> str:
  lines = [f"# {title}", "", f"Layer {report['layer']}, SAE with {report['n_latents']} latents. Activating tokens "
           f"are marked {MARK[0]}like this{MARK[1]}.", ""]
  for kind in ("increased", "decreased"):
    lines += [f"## Most {kind} latents", ""]
    for item in report[kind]:
      lines.append(f"### Latent {item['latent']} (score {item['score']:+.4f})")
      if "mean_act" in item:
        lines.append("")
        lines.append("| model | mean activation | firing rate |")
        lines.append("|---|---|---|")
        for name, value in item["mean_act"].items():
          lines.append(f"| {_cell(name)} | {value:.4f} | {item['fire_rate'][name]:.4f} |")
      lens = item["logit_lens"]
      lines.append("")
      lines.append("Promotes: " + ", ".join(f"`{_cell(t['token'])}`" for t in lens["promoted"]))
      lines.append("")
      lines.append("Suppresses: " + ", ".join(f"`{_cell(t['token'])}`" for t in lens["suppressed"]))
      if item["contexts"]:
        lines.append("")
        for c in item["contexts"]:
          lines.append(f"- ({c['activation']:.3f}) {_cell(c['text'])}")
      lines.append("")
  return "\n".join(lines) + "\n"


def plot_latent_bars(report: Mapping[str, Any], path: str, kind: str = "increased") -> str:
  """Grouped bars: each top latent's delta on each fine-tune."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  items = report[kind]
  names = sorted({n for item in items for n in item["delta_per_finetune"]})
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(items) * max(1, len(names)) + 2), 4))
  width = 0.8 / max(len(names), 1)
  for j, name in enumerate(names):
    ax.bar(np.arange(len(items)) + j * width, [item["delta_per_finetune"].get(name, 0.0) for item in items],
           width, label=name)
  ax.set_xticks(np.arange(len(items)) + 0.4 - width / 2, [str(item["latent"]) for item in items])
  ax.set_xlabel("latent")
  ax.set_ylabel("mean activation delta vs base")
  ax.axhline(0, color="black", linewidth=0.5)
  ax.set_title(f"top {kind} latents, layer {report['layer']}")
  if names:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_report(report: Mapping[str, Any], directory: str, stem: str = "latents", title: str = "Latent report") -> dict[str, str]:
  """JSON + markdown + PNG into `directory`. -> {kind: path}"""
  os.makedirs(directory, exist_ok=True)
  paths = {"json": os.path.join(directory, f"{stem}.json"), "markdown": os.path.join(directory, f"{stem}.md"),
           "png": os.path.join(directory, f"{stem}.png")}
  with open(paths["json"], "w") as handle:
    json.dump(report, handle, indent=1)
  with open(paths["markdown"], "w") as handle:
    handle.write(report_markdown(report, title))
  plot_latent_bars(report, paths["png"])
  return paths


# ----------------------------------------------------------------------------- workdir files

def write_json(path: str, value: Any) -> str:
  """Atomic JSON write (temp file + rename), so a crash never leaves half a summary."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as handle:
    json.dump(value, handle, indent=1, default=_json_default)
  os.replace(tmp, path)
  return path


def _json_default(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def append_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Appends rows (one JSON object per line) and flushes: results survive a crash as produced."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as handle:
    for row in rows:
      handle.write(json.dumps(row, default=_json_default) + "\n")
    handle.flush()


def read_jsonl_rows(path: str) -> list[dict[str, Any]]:
  """Rows of a JSONL file written by append_jsonl; a torn last line (crash mid-write) is dropped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as handle:
    lines = handle.read().splitlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines):
        break
      raise ValueError(f"{path}:{number}: invalid JSON line") from None
  return rows
