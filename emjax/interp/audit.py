"""Data auditing: flag training examples by how strongly they light up persona latents.

One forward per batch (to layer L, early exit), no generation: every example's score is the
mean, over its assistant tokens, of the summed activation of the chosen latents ("max" takes the
largest token instead). Ranking the examples by score finds the bad ones before any training.

    scores = score_records(lm, sae_config, sae_params, layer, records, latents=[7, 12])
    report = ranking_metrics(scores, labels, ks=(10, 50))      # precision/recall@k, AUROC
    write_flagged(path, records, scores, top_k=50)
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from emjax.interp import diffing
from emjax.judge import metrics as metrics_lib
from emjax.models import transformer
from emjax.sae import sae as sae_lib

REDUCE = ("mean", "max")


def chosen_latent_acts(sae_config: sae_lib.SAEConfig, sae_params: sae_lib.SAEParams, residual: jax.Array,
                       latents: jax.Array) -> jax.Array:
  """Activation of each chosen latent at each token (0 where it is not in the token's top-k).

  residual [B, T, D], latents [K] int -> [B, T, K]
  """
  b, t, d = residual.shape
  acts, ids = sae_lib.encode(sae_params, sae_config, residual.reshape(-1, d).astype(jnp.float32))  # [BT, k]
  hit = ids[:, :, None] == latents[None, None, :]                                                  # [BT, k, K]
  return jnp.sum(jnp.where(hit, acts[:, :, None], 0.0), axis=1).reshape(b, t, -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "sae_config", "layer", "compute_dtype"))
def _latent_acts_program(graphdef, state, lora, sae_params, latents, input_ids, attention_mask, *, sae_config,
                         layer: int, compute_dtype):
  """ids [B, T] -> chosen latents' activations [B, T, K] at layer `layer`."""
  residual = transformer.forward(graphdef, state, input_ids, attention_mask, capture=(layer,), exit_after=layer,
                                 lora=lora, compute_dtype=compute_dtype).captured[layer]
  return chosen_latent_acts(sae_config, sae_params, residual, latents)


def latent_acts(lm: Any, sae_config: sae_lib.SAEConfig, sae_params: sae_lib.SAEParams, layer: int,
                latents: Sequence[int], input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  """Host [B, T, K] activations of `latents` (the model's adapter, if any, applied)."""
  latents = np.asarray(latents, np.int32)
  if latents.ndim != 1 or latents.size == 0 or latents.min() < 0 or latents.max() >= sae_config.n_latents:
    raise ValueError(f"latents {latents.tolist()} must be a non-empty list of ids in 0..{sae_config.n_latents - 1}")
  out = _latent_acts_program(lm.graphdef, lm.state, lm.lora, sae_params, jnp.asarray(latents),
                             jnp.asarray(input_ids), jnp.asarray(attention_mask), sae_config=sae_config,
                             layer=int(layer) % lm.config.num_layers, compute_dtype=lm.compute_dtype)
  return np.asarray(out)


def reduce_scores(acts: np.ndarray, weights: np.ndarray, reduce: str = "mean") -> np.ndarray:
  """Per-row score from token activations. acts [B, T, K], weights [B, T] -> [B].

  mean: weighted mean over tokens of the sum over latents; max: the largest selected token.
  Rows with no selected token score 0.
  """
  if reduce not in REDUCE:
    raise ValueError(f"reduce={reduce!r}; expected one of {REDUCE}")
  per_token = acts.sum(-1)                                                    # [B, T]
  if reduce == "mean":
    return (per_token * weights).sum(-1) / np.maximum(weights.sum(-1), 1.0)
  return np.where(weights > 0, per_token, 0.0).max(-1)


def score_records(lm: Any, sae_config: sae_lib.SAEConfig, sae_params: sae_lib.SAEParams, layer: int,
                  records: Sequence[Any], latents: Sequence[int], *, where: str = "assistant", reduce: str = "mean",
                  batch_size: int = 8, max_tokens: int = 256) -> np.ndarray:
  """One score per record (see module docstring). -> [len(records)] float"""
  scores = np.zeros(len(records), np.float64)
  for ids, mask, weights, index in diffing.token_batches(lm.tokenizer, records, batch_size=batch_size,
                                                         max_tokens=max_tokens, where=where):
    acts = latent_acts(lm, sae_config, sae_params, layer, latents, ids, mask)
    scores[index] = reduce_scores(acts, weights, reduce)[:len(index)]
  return scores


def ranking_metrics(scores: Sequence[float], labels: Sequence[int], ks: Sequence[int] = (10, 50, 100)) -> dict[str, Any]:
  """precision@k / recall@k of the top-k scores and AUROC against 0/1 labels (1 = bad)."""
  scores = np.asarray(scores, float)
  labels = np.asarray(labels).astype(int)
  if scores.shape != labels.shape:
    raise ValueError(f"{scores.shape[0]} scores but {labels.shape[0]} labels")
  order = np.lexsort((np.arange(len(scores)), -scores))      # descending, stable
  positives = int(labels.sum())
  out: dict[str, Any] = {"n": int(len(scores)), "n_bad": positives, "base_rate": positives / max(len(scores), 1)}
  for k in ks:
    k = min(int(k), len(scores))
    hits = int(labels[order[:k]].sum())
    out[f"precision@{k}"] = hits / max(k, 1)
    out[f"recall@{k}"] = hits / max(positives, 1)
  out["auroc"] = metrics_lib.auroc(scores, labels) if 0 < positives < len(scores) else None
  return out


def write_flagged(path: str, records: Sequence[Any], scores: Sequence[float], *, top_k: int | None = None,
                  threshold: float | None = None) -> int:
  """Writes the flagged records (top_k highest, and/or score >= threshold) as JSONL, highest first.

  Each row is the record plus `audit: {score, rank, index}`. Returns the number written.
  """
  scores = np.asarray(scores, float)
  order = np.lexsort((np.arange(len(scores)), -scores))
  chosen = order if top_k is None else order[:top_k]
  if threshold is not None:
    chosen = [i for i in chosen if scores[i] >= threshold]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as handle:
    for rank, i in enumerate(chosen):
      record = records[i] if isinstance(records[i], dict) else {"messages": records[i]}
      handle.write(json.dumps({**record, "audit": {"score": float(scores[i]), "rank": rank, "index": int(i)}}) + "\n")
  return len(chosen)
