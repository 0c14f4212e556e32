"""Train a TopK SAE on one layer's residual stream: harvest -> cache -> train -> save -> eval.

    python -m experiments.train_sae --config=configs/sae.py:quick --workdir=runs/sae_quick

Writes into --workdir: config.json, activations/ (unless --config.cache_dir is shared),
checkpoints/, metrics.jsonl, tensorboard/, sae/ (SAELens layout), density.png, summary.json.
Rerunning with the same workdir reuses the cache and resumes training.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time

from absl import app, flags, logging
from ml_collections import config_flags

from emjax.sae import evals, files, store, train
from emjax.sae import sae as sae_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/sae.py", "ml_collections config file (configs/sae.py[:quick|:paper])."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; rerunning resumes.", required=True)


def _documents(corpus: str, seed: int):
    """Built-in data is ordered by domain; shuffle it so a prefix covers every domain."""
    if corpus.startswith("builtin:"):
        documents = list(store.iter_documents(corpus))
        random.Random(seed).shuffle(documents)
        return documents
    return store.iter_documents(corpus)


def _harvest_caches(lm, layer: int, cfg, train_dir: str, eval_dir: str) -> int:
    """Harvest train + eval activations once; returns how many documents they used."""
    documents = _documents(cfg.corpus, cfg.seed)
    used = itertools.count()
    counted = (doc for doc, _ in zip(documents, used))
    rows = store.harvest(
        lm, layer, counted, batch_size=cfg.harvest_batch_size, max_tokens=cfg.max_tokens_per_doc,
        max_total_tokens=cfg.harvest_tokens + cfg.eval_tokens,
    )
    mixed = store.shuffle_buffer(rows, cfg.shuffle_buffer_tokens, 1024, seed=cfg.seed)
    meta = {"model": lm.name, "layer": layer, "corpus": cfg.corpus}

    def take(iterator, limit):
        total = 0
        for batch in iterator:
            batch = batch[: limit - total]
            total += batch.shape[0]
            yield batch
            if total >= limit:
                return

    start = time.perf_counter()
    train_cache = store.write_cache(train_dir, take(mixed, cfg.harvest_tokens), metadata=meta)
    seconds = time.perf_counter() - start
    store.write_cache(eval_dir, take(mixed, cfg.eval_tokens), metadata=meta)
    documents_used = next(used)
    logging.info("harvested %d tokens in %.0fs (%.0f tok/s) from %d documents",
                 train_cache.num_tokens, seconds, train_cache.num_tokens / seconds, documents_used)
    with open(os.path.join(train_dir, "harvest.json"), "w") as handle:
        json.dump({"documents_used": documents_used, "seconds": seconds,
                   "tokens_per_s": train_cache.num_tokens / seconds}, handle)
    return documents_used


def main(argv):
    del argv
    import emjax

    cfg = _CONFIG.value
    workdir = _WORKDIR.value
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as handle:
        handle.write(cfg.to_json_best_effort(indent=2))

    lm = emjax.load_model(cfg.model)
    layer = cfg.layer if cfg.layer >= 0 else lm.config.num_layers // 2
    d_model = lm.config.hidden_size
    n_latents = cfg.n_latents or cfg.expansion * d_model
    sae_config = sae_lib.SAEConfig(
        d_in=d_model, n_latents=n_latents, k=cfg.k,
        k_aux=None if cfg.k_aux < 0 else cfg.k_aux, dead_tokens=cfg.dead_tokens,
        batch_topk=cfg.batch_topk,
    )

    cache_root = cfg.cache_dir or os.path.join(workdir, "activations")
    train_dir, eval_dir = os.path.join(cache_root, "train"), os.path.join(cache_root, "eval")
    if os.path.exists(os.path.join(eval_dir, store.META_FILE)):
        with open(os.path.join(train_dir, "harvest.json")) as handle:
            documents_used = json.load(handle)["documents_used"]
    else:
        documents_used = _harvest_caches(lm, layer, cfg, train_dir, eval_dir)
    train_cache, eval_cache = store.open_cache(train_dir), store.open_cache(eval_dir)
    if train_cache.meta.get("layer") != layer or train_cache.d_in != d_model:
        raise ValueError(
            f"{train_dir}: cached layer {train_cache.meta.get('layer')} / width {train_cache.d_in}, "
            f"but this run wants layer {layer} / width {d_model}; use another cache_dir"
        )

    mesh = train.make_mesh(cfg.num_devices or None, cfg.model_parallel)
    state = train.fit(
        sae_config,
        lambda step: train_cache.batch_at(step, cfg.batch_size, cfg.seed),
        cfg.num_steps,
        train_cache.sample(16_384, cfg.seed),
        learning_rate=None if cfg.learning_rate < 0 else cfg.learning_rate,
        warmup_steps=cfg.warmup_steps, decay_fraction=cfg.decay_fraction, seed=cfg.seed,
        b_dec_init=cfg.b_dec_init, mesh=mesh, workdir=workdir,
        checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
    )
    sae_dir = files.save_sae(
        os.path.join(workdir, "sae"), sae_config, state.params,
        input_scale=float(state.input_scale), model_name=lm.name, layer=layer,
    )
    _, params, _ = files.load_sae(sae_dir)  # evaluate exactly what was written

    eval_batches = (eval_cache.rows(range(i, min(i + 2048, eval_cache.num_tokens)))
                    for i in range(0, eval_cache.num_tokens, 2048))
    recon = evals.reconstruction_metrics(params, sae_config, eval_batches)
    evals.plot_density_histogram(recon.pop("density"), os.path.join(workdir, "density.png"),
                                 title=f"layer {layer}, {n_latents} latents, k={cfg.k}")
    held_out = itertools.islice(_documents(cfg.corpus, cfg.seed), documents_used, None)
    downstream = evals.downstream_metrics(
        lm, params, sae_config, layer,
        evals.eval_token_batches(lm, held_out, batch_size=8, max_tokens=cfg.max_tokens_per_doc,
                                 max_batches=cfg.eval_downstream_batches),
    )
    summary = {"model": lm.name, "layer": layer, "n_latents": n_latents, "k": cfg.k,
               "steps": int(state.step), "train_tokens_cached": train_cache.num_tokens,
               **{f"eval/{k}": v for k, v in {**recon, **downstream}.items()}, "sae_dir": sae_dir}
    with open(os.path.join(workdir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    logging.info("summary: %s", json.dumps(summary))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
