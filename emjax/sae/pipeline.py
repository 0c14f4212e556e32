"""Harvest -> train -> save -> evaluate, as one resumable library call.

Used by the end-to-end pipeline (emjax/pipeline) and by experiments/train_sae.py: with the
same workdir, a rerun reuses the activation cache and resumes training from its checkpoint.
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


def train_on_model(lm, workdir: str, *, layer: int, expansion: int = 8, k: int = 32, corpus: str = "builtin:all",
                   harvest_tokens: int = 65_536, eval_tokens: int = 8_192, num_steps: int = 300,
                   batch_size: int = 1024, max_tokens_per_doc: int = 128, seed: int = 0,
                   learning_rate: float | None = None, warmup_steps: int = 20, checkpoint_every: int = 100,
                   downstream_batches: int = 4, progress: bool = False) -> dict[str, Any]:
  """Trains a TopK SAE on `lm`'s layer-`layer` residual; returns a JSON summary with `sae_dir`."""
  layer = int(layer) % lm.config.num_layers
  d_model = lm.config.hidden_size
  sae_config = sae_lib.SAEConfig(d_in=d_model, n_latents=expansion * d_model, k=k)
  train_dir, eval_dir = os.path.join(workdir, "activations", "train"), os.path.join(workdir, "activations", "eval")
  if os.path.exists(os.path.join(eval_dir, store.META_FILE)):
    with open(os.path.join(train_dir, "harvest.json")) as handle:
      documents_used = json.load(handle)["documents_used"]
  else:
    documents_used = harvest_caches(lm, layer, train_dir, eval_dir, corpus=corpus, harvest_tokens=harvest_tokens,
                                    eval_tokens=eval_tokens, max_tokens_per_doc=max_tokens_per_doc, seed=seed)
  train_cache, eval_cache = store.open_cache(train_dir), store.open_cache(eval_dir)
  if train_cache.meta.get("layer") != layer or train_cache.d_in != d_model:
    raise ValueError(f"{train_dir}: cached layer {train_cache.meta.get('layer')} / width {train_cache.d_in}, "
                     f"but this run wants layer {layer} / width {d_model}; use another workdir")
  state = train.fit(sae_config, lambda step: train_cache.batch_at(step, batch_size, seed), num_steps,
                    train_cache.sample(min(16_384, train_cache.num_tokens), seed), learning_rate=learning_rate,
                    warmup_steps=warmup_steps, seed=seed, workdir=os.path.join(workdir, "train"),
                    checkpoint_every=checkpoint_every, log_every=10, progress=progress)
  sae_dir = files.save_sae(os.path.join(workdir, "sae"), sae_config, state.params,
                           input_scale=float(state.input_scale), model_name=lm.name, layer=layer)
  _, params, _ = files.load_sae(sae_dir)  # evaluate exactly what was written
  eval_batches = (eval_cache.rows(range(i, min(i + 2048, eval_cache.num_tokens)))
                  for i in range(0, eval_cache.num_tokens, 2048))
  recon = evals.reconstruction_metrics(params, sae_config, eval_batches)
  density_png = evals.plot_density_histogram(recon.pop("density"), os.path.join(workdir, "density.png"),
                                             title=f"layer {layer}, {sae_config.n_latents} latents, k={k}")
  held_out = itertools.islice(shuffled_documents(corpus, seed), documents_used, None)
  downstream = evals.downstream_metrics(
      lm, params, sae_config, layer,
      evals.eval_token_batches(lm, held_out, batch_size=8, max_tokens=max_tokens_per_doc,
                               max_batches=downstream_batches))
  summary = {"model": lm.name, "layer": layer, "n_latents": sae_config.n_latents, "k": k, "steps": int(state.step),
             "train_tokens": int(train_cache.num_tokens), "sae_dir": sae_dir, "density_png": density_png,
             "fvu": recon.get("fvu"), "l0": recon.get("l0"), "dead_fraction": recon.get("dead_frac"),
             "ce_loss_score": downstream.get("ce_loss_score"), "kl_div": downstream.get("kl_div"),
             "eval": {**recon, **downstream}}
  with open(os.path.join(workdir, "summary.json"), "w") as handle:
    json.dump(summary, handle, indent=1, default=float)
  return json.loads(json.dumps(summary, default=float))


def describe_existing(path: str, lm) -> dict[str, Any]:
  """Summary for a given SAE directory (ours, SAELens or sparsify), checked against the model."""
  loader = files.load_sparsify if os.path.isfile(os.path.join(path, "sae.safetensors")) else files.load_sae
  sae_config, _, meta = loader(path)
  files.check_matches_model(sae_config, meta, lm)
  return {"sae_dir": path, "layer": meta.get("layer"), "n_latents": sae_config.n_latents, "k": sae_config.k,
          "model": meta.get("model_name") or meta.get("model"), "given": True}
