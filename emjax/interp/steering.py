"""Steering and ablation sweeps: does a direction *control* misalignment?

A direction d (unit, [D]) is one of
  * a latent's decoder row (`decoder_direction`),
  * the mean-difference direction: mean residual on misaligned answers minus on aligned ones
    (`mean_difference_direction`, Soligo et al.),
  * a random direction (`random_direction`), the control.

Steering adds `c * median_residual_norm * d` to the residual after layer L at every position
(prompt and generated tokens); ablation projects d out of the residual after *every* layer.
Every point of the grid is the same intervention pytree shape (one steering vector, one ablation
slot, either possibly zero), so the sampler compiles once for the whole grid: strengths,
directions and ablations are data (`emjax.models.intervene`).

    norm = median_residual_norm(lm, layer, batches)
    grid = sweep_grid(lm.config, layer, {"latent_7": d7, "random": rnd}, [0, .2, .4], norm, ablate=True)
    for point in grid:
      rows = generate_and_judge(lm, questions, judge, intervention=point.intervention, ...)
      summary = summarize_rows(rows, rubric)
    best = strongest_coherent(results, max_incoherent=0.10)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emjax.interp import diffing
from emjax.judge import metrics as metrics_lib
from emjax.models import intervene
from emjax.models.config import ModelConfig
from emjax.sae import sae as sae_lib


def unit(vector: Any) -> np.ndarray:
  """[D] -> [D] with L2 norm 1; refuses the zero vector (there is no direction to steer along)."""
  vector = np.asarray(vector, np.float32)
  norm = float(np.linalg.norm(vector))
  if not np.isfinite(norm) or norm == 0.0:
    raise ValueError(f"cannot normalise a direction with norm {norm}")
  return vector / norm


def decoder_direction(sae_params: sae_lib.SAEParams, latent: int) -> np.ndarray:
  """Unit decoder row of `latent`. -> [D]"""
  n = sae_params.decoder_w.shape[0]
  if not 0 <= int(latent) < n:
    raise ValueError(f"latent {latent} does not exist; the SAE has latents 0..{n - 1}")
  return unit(np.asarray(sae_params.decoder_w[int(latent)]))


def random_direction(d: int, seed: int = 0) -> np.ndarray:
  """A uniformly random unit direction in R^d (the control with the same norm as any steer)."""
  return unit(np.random.default_rng(seed).normal(size=d))


def median_residual_norm(lm: Any, layer: int, batches: Iterable[tuple]) -> float:
  """Median L2 norm of the layer-L residual over the selected (weight > 0) tokens of `batches`."""
  norms = []
  for ids, mask, weights, *_ in batches:
    residual = np.asarray(lm.residuals(ids, mask, layers=(layer,))[int(layer) % lm.config.num_layers])  # [B, T, D]
    norms.append(np.linalg.norm(residual, axis=-1)[np.asarray(weights) > 0])
  values = np.concatenate(norms) if norms else np.zeros(0)
  if values.size == 0:
    raise ValueError("median_residual_norm: the batches select no token")
  return float(np.median(values))


def mean_difference_direction(lm: Any, layer: int, misaligned_records: Sequence[Any],
                              aligned_records: Sequence[Any], *, batch_size: int = 8,
                              max_tokens: int = 256) -> np.ndarray:
  """Mean layer-L residual over the assistant tokens of misaligned answers minus aligned ones. -> [D]

  Not normalised: its norm says how far apart the two groups sit.
  """
  if not misaligned_records or not aligned_records:
    raise ValueError(f"mean_difference_direction needs both groups; got {len(misaligned_records)} misaligned "
                     f"and {len(aligned_records)} aligned answers")
  means = []
  for records in (misaligned_records, aligned_records):
    batches = diffing.token_batches(lm.tokenizer, records, batch_size=batch_size, max_tokens=max_tokens)
    total, count = np.zeros(lm.config.hidden_size), 0.0
    for ids, mask, weights, _ in batches:
      residual = np.asarray(lm.residuals(ids, mask, layers=(layer,))[int(layer) % lm.config.num_layers], np.float64)
      total += np.einsum("btd,bt->d", residual, weights)
      count += float(weights.sum())
    means.append(total / max(count, 1.0))
  return (means[0] - means[1]).astype(np.float32)


# ----------------------------------------------------------------------------- the grid

@dataclasses.dataclass
class GridPoint:
  direction: str            # name of the direction ("latent_7", "mean_diff", "random", ...)
  mode: str                 # "steer" or "ablate"
  scale: float              # c, in units of the median residual norm (0 for ablation)
  intervention: intervene.Intervention

  @property
  def key(self) -> str:
    return f"{self.direction}|{self.mode}|{self.scale:+.4f}"


def grid_intervention(cfg: ModelConfig, layer: int, steer_vector: Any, scale: float,
                      ablate_direction: Any | None = None) -> intervene.Intervention:
  """Steer `scale * steer_vector` after `layer`, and project `ablate_direction` out after every layer.

  Always one ablation slot (zeros when there is no ablation: h - <h, 0> 0 == h exactly), so steering
  and ablation points share one compiled sampler.
  """
  L, D = cfg.num_layers, cfg.hidden_size
  layer = int(layer) % L
  vec = np.zeros((L, D), np.float32)
  vec[layer] = np.asarray(steer_vector, np.float32)
  scales = np.zeros((L,), np.float32)
  scales[layer] = 1.0   # marks the layer active; the strength lives in steer_scale via with_scale below
  dirs = np.zeros((L, 1, D), np.float32)
  if ablate_direction is not None:
    dirs[:, 0] = unit(ablate_direction)
  iv = intervene.empty(cfg, num_ablate=1).replace(steer_vec=jnp.asarray(vec), steer_scale=jnp.asarray(scales),
                                                  ablate_dirs=jnp.asarray(dirs))
  return intervene.with_scale(iv, scale)


def sweep_grid(cfg: ModelConfig, layer: int, directions: Mapping[str, Any], scales: Sequence[float],
               residual_norm: float, *, ablate: Sequence[str] = ()) -> list[GridPoint]:
  """Steering points c x norm x unit(d) for every direction and c, plus ablation of the named directions."""
  points = []
  for name, direction in directions.items():
    d = unit(direction)
    for c in scales:
      points.append(GridPoint(name, "steer", float(c), grid_intervention(cfg, layer, d * residual_norm, float(c))))
  for name in ablate:
    if name not in directions:
      raise KeyError(f"cannot ablate {name!r}: no such direction (have {sorted(directions)})")
    points.append(GridPoint(name, "ablate", 0.0, grid_intervention(cfg, layer, np.zeros(cfg.hidden_size), 0.0,
                                                                   directions[name])))
  return points


# ----------------------------------------------------------------------------- generate + judge

def question_texts(questions: Sequence[Any]) -> list[tuple[str, str, str | None, str]]:
  """(question id, prompt text, system prompt, category) for Question objects or plain strings."""
  out = []
  for index, q in enumerate(questions):
    if isinstance(q, str):
      out.append((f"q{index}", q, None, "uncategorized"))
    else:
      for p_index, text in enumerate(q.paraphrases):
        out.append((q.id if len(q.paraphrases) == 1 else f"{q.id}#{p_index}", text, q.system, q.category))
  return out


def generate_and_judge(lm: Any, questions: Sequence[Any], judge: Any, *, intervention=None, num_samples: int = 4,
                       max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0,
                       rubric: str = "aligned_coherent", batch_size: int = 32) -> list[dict[str, Any]]:
  """Samples answers (with the intervention) and grades them. -> rows {question_id, question, answer, ...judgment}.

  The same seed gives every grid point the same random stream, so differences between points
  come from the intervention, not from sampling noise.
  """
  from emjax import sampling
  items = question_texts(questions)
  prompts = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
             for _, text, system, _ in items]
  out = sampling.generate(lm, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                          num_samples=num_samples, intervention=intervention, batch_size=batch_size)
  texts = [items[i][1] for i in out.prompt_index]
  judgments = judge.score(texts, out.texts, rubric=rubric)
  rows = []
  for j, (p, s) in enumerate(zip(out.prompt_index, out.sample_index)):
    qid, text, _, category = items[p]
    rows.append({"question_id": qid, "question": text, "category": category, "sample": s, "answer": out.texts[j],
                 **judgments[j].to_json()})
  return rows


def summarize_rows(rows: Sequence[Mapping[str, Any]], rubric: str, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
  """Misaligned share and strict/loose incoherence (with 95% CIs) of judged rows."""
  s = metrics_lib.summarize(rows, rubric=rubric, n_boot=n_boot, seed=seed)
  return {"misaligned": s["misaligned"]["share"], "misaligned_ci95": s["misaligned"]["ci95"],
          "incoherent": s["incoherent_strict"]["share"], "incoherent_ci95": s["incoherent_strict"]["ci95"],
          "incoherent_loose": s["incoherent_loose"]["share"], "n_answers": s["n_answers"], "rubric": rubric}


def strongest_coherent(results: Sequence[Mapping[str, Any]], max_incoherent: float = 0.10) -> dict[str, Any]:
  """Per (model, direction): the largest-|c| steering point whose incoherence stays <= max_incoherent.

  `results` rows have model, direction, mode, scale, misaligned, incoherent. Directions with no
  coherent point other than c = 0 report scale 0.
  """
  best: dict[str, Any] = {}
  for row in results:
    if row["mode"] != "steer" or row["incoherent"] is None or row["incoherent"] > max_incoherent:
      continue
    key = f"{row.get('model', 'model')}|{row['direction']}"
    if key not in best or abs(row["scale"]) > abs(best[key]["scale"]):
      best[key] = {k: row[k] for k in ("scale", "misaligned", "incoherent")}
  return best
