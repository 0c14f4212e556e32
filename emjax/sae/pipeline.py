"""Harvest -> train -> save -> evaluate, as one resumable library call.

The one place the SAE recipe lives: experiments/train_sae.py and the end-to-end pipeline
(emjax/pipeline) both call `train_on_model`. With the same workdir a rerun reuses the
activation cache and resumes training from its checkpoint.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

from emjax.sae import evals, files, store, train
from emjax.sae import sae as sae_lib


def shuffled_documents(corpus: str, seed: int):
  """Built-in data is ordered by domain; shuffle it so a prefix covers every domain."""
  if corpus.startswith("builtin:"):
    documents = list(store.iter_documents(corpus))
    random.Random(seed).shuffle(documents)
    return documents
  return store.iter_documents(corpus)


def _take(iterator, limit: int):
  total = 0
  for batch in iterator:
    batch = batch[: limit - total]
    total += batch.shape[0]
    yield batch
    if total >= limit:
      return


def harvest_caches(lm, layer: int, train_dir: str, eval_dir: str, *, corpus: str, harvest_tokens: int,
                   eval_tokens: int, max_tokens_per_doc: int, batch_size: int = 16,
                   shuffle_buffer_tokens: int = 65_536, seed: int = 0) -> int:
  """Harvests train + eval activations once (memory-mapped shards); returns documents used."""
  documents = shuffled_documents(corpus, seed)
  used = itertools.count()
  counted = (doc for doc, _ in zip(documents, used))
  rows = store.harvest(lm, layer, counted, batch_size=batch_size, max_tokens=max_tokens_per_doc,
                       max_total_tokens=harvest_tokens + eval_tokens)
  mixed = store.shuffle_buffer(rows, shuffle_buffer_tokens, 1024, seed=seed)
  meta = {"model": lm.name, "layer": layer, "corpus": corpus}
  start = time.perf_counter()
  train_cache = store.write_cache(train_dir, _take(mixed, harvest_tokens), metadata=meta)
  seconds = time.perf_counter() - start
  store.write_cache(eval_dir, _take(mixed, eval_tokens), metadata=meta)
  documents_used = next(used)
  with open(os.path.join(train_dir, "harvest.json"), "w") as handle:
    json.dump({"documents_used": documents_used, "seconds": seconds,
               "tokens_per_s": train_cache.num_tokens / max(seconds, 1e-9)}, handle)
  return documents_used


def train_on_model(lm, workdir: str, cfg, *, progress: bool = True) -> dict[str, Any]:
  """Trains a TopK SAE on `lm`'s residual stream; returns a JSON summary (with `sae_dir`).

  `cfg` has the fields of configs/sae.py (layer, corpus, harvest/eval token counts, expansion or
  n_latents, k, optimizer, mesh and logging settings). With the same workdir a rerun reuses the
  activation cache and resumes training from its last checkpoint.
  """
  layer = int(cfg.layer) % lm.config.num_layers if int(cfg.layer) >= 0 else lm.config.num_layers // 2
  d_model = lm.config.hidden_size
  n_latents = int(cfg.get("n_latents", 0) or 0) or int(cfg.expansion) * d_model
  sae_config = sae_lib.SAEConfig(d_in=d_model, n_latents=n_latents, k=int(cfg.k),
                                 k_aux=None if int(cfg.k_aux) < 0 else int(cfg.k_aux),
                                 dead_tokens=int(cfg.dead_tokens), batch_topk=bool(cfg.batch_topk))
  cache_root = cfg.cache_dir or os.path.join(workdir, "activations")
  train_dir, eval_dir = os.path.join(cache_root, "train"), os.path.join(cache_root, "eval")
  if os.path.exists(os.path.join(eval_dir, store.META_FILE)):
    with open(os.path.join(train_dir, "harvest.json")) as handle:
      documents_used = json.load(handle)["documents_used"]
  else:
    documents_used = harvest_caches(
        lm, layer, train_dir, eval_dir, corpus=cfg.corpus, harvest_tokens=int(cfg.harvest_tokens),
        eval_tokens=int(cfg.eval_tokens), max_tokens_per_doc=int(cfg.max_tokens_per_doc),
        batch_size=int(cfg.harvest_batch_size), shuffle_buffer_tokens=int(cfg.shuffle_buffer_tokens),
        seed=int(cfg.seed))
  train_cache, eval_cache = store.open_cache(train_dir), store.open_cache(eval_dir)
  if train_cache.meta.get("layer") != layer or train_cache.d_in != d_model:
    raise ValueError(f"{train_dir}: cached layer {train_cache.meta.get('layer')} / width {train_cache.d_in}, "
                     f"but this run wants layer {layer} / width {d_model}; use another cache_dir")
  batch_size, seed = int(cfg.batch_size), int(cfg.seed)
  state = train.fit(
      sae_config, lambda step: train_cache.batch_at(step, batch_size, seed), int(cfg.num_steps),
      train_cache.sample(min(16_384, train_cache.num_tokens), seed),
      learning_rate=None if float(cfg.learning_rate) < 0 else float(cfg.learning_rate),
      warmup_steps=int(cfg.warmup_steps), decay_fraction=float(cfg.decay_fraction), seed=seed,
      b_dec_init=cfg.b_dec_init, mesh=train.make_mesh(int(cfg.num_devices) or None, int(cfg.model_parallel)),
      workdir=workdir, checkpoint_every=int(cfg.checkpoint_every), log_every=int(cfg.log_every), progress=progress)
  sae_dir = files.save_sae(os.path.join(workdir, "sae"), sae_config, state.params,
                           input_scale=float(state.input_scale), model_name=lm.name, layer=layer)
  _, params, _ = files.load_sae(sae_dir)  # evaluate exactly what was written
  eval_batches = (eval_cache.rows(range(i, min(i + 2048, eval_cache.num_tokens)))
                  for i in range(0, eval_cache.num_tokens, 2048))
  recon = evals.reconstruction_metrics(params, sae_config, eval_batches)
  density_png = evals.plot_density_histogram(recon.pop("density"), os.path.join(workdir, "density.png"),
                                             title=f"layer {layer}, {n_latents} latents, k={sae_config.k}")
  held_out = itertools.islice(shuffled_documents(cfg.corpus, seed), documents_used, None)
  downstream = evals.downstream_metrics(
      lm, params, sae_config, layer,
      evals.eval_token_batches(lm, held_out, batch_size=8, max_tokens=int(cfg.max_tokens_per_doc),
                               max_batches=int(cfg.eval_downstream_batches)))
  metrics = {**recon, **downstream}
  summary = {"model": lm.name, "layer": layer, "n_latents": n_latents, "k": sae_config.k, "steps": int(state.step),
             "train_tokens": int(train_cache.num_tokens), "sae_dir": sae_dir, "density_png": density_png,
             "fvu": metrics.get("fvu"), "l0": metrics.get("l0"), "dead_fraction": metrics.get("dead_frac"),
             "ce_loss_score": metrics.get("ce_loss_score"), "kl_div": metrics.get("kl_div"),
             **{f"eval/{k}": v for k, v in metrics.items()}}
  summary = json.loads(json.dumps(summary, default=float))
  with open(os.path.join(workdir, "summary.json"), "w") as handle:
    json.dump(summary, handle, indent=1)
  return summary


def describe_existing(path: str, lm) -> dict[str, Any]:
  """Summary for a given SAE directory (ours, SAELens or sparsify), checked against the model."""
  sae_config, _, layer = files.load_for_model(path, lm)
  return {"sae_dir": path, "layer": layer, "n_latents": sae_config.n_latents, "k": sae_config.k, "given": True}
