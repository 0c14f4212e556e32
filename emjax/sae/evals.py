"""SAE evaluations: reconstruction (FVU, explained variance, L0, dead fraction, latent
density) and downstream loss with the reconstruction spliced into the model.

Metric names follow SAELens/sparsify so numbers read the same across tools:
  fvu                 sum ||x - x_hat||^2 / sum ||x - mean x||^2 over all eval tokens
  explained_variance  1 - fvu
  l0                  mean number of non-zero latents per token
  dead_frac           share of latents that never fired on the eval tokens
  ce_loss_score       (CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean)
  kl_div              mean KL(clean next-token dist || dist with the SAE spliced in)
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emjax.sae import sae as sae_lib


@partial(jax.jit, static_argnums=(1,))
def _reconstruction_sums(params, config, x):
    acts, ids = sae_lib.encode(params, config, x)
    x_hat = sae_lib.decode(params, acts, ids)
    fired = jnp.zeros((config.n_latents,), jnp.float32).at[ids.reshape(-1)].add(
        (acts > 0).reshape(-1).astype(jnp.float32)
    )  # [N] firing counts
    return {
        "sq_err": jnp.sum(jnp.square(x - x_hat)),
        "sum_x": jnp.sum(x, 0),
        "sum_sq_x": jnp.sum(jnp.square(x)),
        "active": jnp.sum((acts > 0).astype(jnp.float32)),
        "fired": fired,
    }


def reconstruction_metrics(
    params: sae_lib.SAEParams, config: sae_lib.SAEConfig, batches: Iterable[np.ndarray]
) -> dict[str, Any]:
    """Streamed over batches of raw activations [B, D] (params must take raw inputs).

    Returns scalars plus ``density`` [N]: each latent's firing frequency.
    """
    totals: dict[str, Any] | None = None
    count = 0
    for batch in batches:
        batch = jnp.asarray(batch, jnp.float32)
        if batch.shape[-1] != config.d_in:
            raise ValueError(f"activations have width {batch.shape[-1]}, the SAE expects {config.d_in}")
        sums = _reconstruction_sums(params, config, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        count += batch.shape[0]
    if totals is None:
        raise ValueError("reconstruction_metrics got no batches")
    totals = jax.tree.map(np.asarray, totals)
    mean = totals["sum_x"] / count
    total_var = float(totals["sum_sq_x"] - count * np.sum(mean**2))
    fvu = float(totals["sq_err"]) / max(total_var, 1e-12)
    density = totals["fired"] / count
    return {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": float(totals["active"]) / count,
        "dead_frac": float(np.mean(density == 0)),
        "num_tokens": count,
        "density": density,
    }


def plot_density_histogram(density: np.ndarray, path: str, title: str = "") -> str:
    """Histogram of log10 firing frequency per latent (dead latents counted apart) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = density[density > 0]
    fig, axis = plt.subplots(figsize=(6, 3.5))
    if alive.size:
        axis.hist(np.log10(alive), bins=50, color="#3b6ea5")
    axis.set_xlabel("log10 firing frequency (fraction of tokens)")
    axis.set_ylabel("latents")
    dead = int(np.sum(density == 0))
    axis.set_title(f"{title}  dead: {dead}/{density.size}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Downstream: splice x_hat into the model
# ---------------------------------------------------------------------------------------------


def _next_token_ce(logits, input_ids, valid):
    """Sum of next-token cross-entropy over valid positions. logits [B, T, V] -> []"""
    logprobs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, T-1, V]
    target = input_ids[:, 1:]
    picked = jnp.take_along_axis(logprobs, target[..., None], axis=-1)[..., 0]  # [B, T-1]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), logprobs


def _spliced_losses(graphdef, model_state, params, input_ids, attention_mask, splice_mask, *,
                    config, layer, forward):
    """CE clean / SAE / zero-ablation and KL(clean || SAE), all from one compiled graph.

    splice_mask [B, T]: positions whose residual is replaced (non-special real tokens; BOS
    and chat tokens keep their clean residual as in SAELens' evals).
    """
    clean = forward(graphdef, model_state, input_ids, attention_mask, capture=(layer,))
    residual = clean.captured[layer]  # [B, T, D]
    batch, length, width = residual.shape
    x_hat = sae_lib.reconstruct(params, config, residual.reshape(-1, width)).reshape(residual.shape)
    keep = splice_mask[..., None]
    with_sae = jnp.where(keep, x_hat, residual)
    zeroed = jnp.where(keep, 0.0, residual)

    def resume(residual_in):
        return forward(graphdef, model_state, input_ids, attention_mask,
                       residual_in=residual_in, start_layer=layer + 1).logits

    # the loss is scored where the *next* token is a real token and the current one spliced
    valid = splice_mask[:, :-1] & attention_mask[:, 1:].astype(bool)
    ce_clean, clean_logprobs = _next_token_ce(clean.logits, input_ids, valid)
    ce_sae, sae_logprobs = _next_token_ce(resume(with_sae), input_ids, valid)
    ce_zero, _ = _next_token_ce(resume(zeroed), input_ids, valid)
    kl = jnp.sum(jnp.exp(clean_logprobs) * (clean_logprobs - sae_logprobs), axis=-1)  # [B, T-1]
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "kl": jnp.sum(jnp.where(valid, kl, 0.0)),
        "count": jnp.sum(valid.astype(jnp.float32)),
    }


def downstream_metrics(
    lm: Any,
    params: sae_lib.SAEParams,
    config: sae_lib.SAEConfig,
    layer: int,
    token_batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> dict[str, float]:
    """ce_loss_score and KL over (input_ids [B,T], attention_mask [B,T], splice_mask [B,T]).

    ``params`` take raw residuals (a saved/loaded SAE, or ``fold_input_scale`` of a state).
    """
    from emjax.models.transformer import forward

    if config.d_in != lm.config.hidden_size:
        raise ValueError(
            f"SAE d_in={config.d_in} but the model's residual width is {lm.config.hidden_size}"
        )
    if not 0 <= layer < lm.config.num_layers - 1:
        raise ValueError(
            f"splice layer {layer} must be in 0..{lm.config.num_layers - 2} (a later block must read it)"
        )
    compiled = jax.jit(
        partial(_spliced_losses, config=config, layer=layer, forward=forward), static_argnums=(0,)
    )
    totals = None
    for input_ids, attention_mask, splice_mask in token_batches:
        sums = compiled(lm.graphdef, lm.state, params, jnp.asarray(input_ids),
                        jnp.asarray(attention_mask), jnp.asarray(splice_mask))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError("downstream_metrics got no batches")
    count = float(totals["count"])
    ce_clean, ce_sae, ce_zero = (float(totals[n]) / count for n in ("ce_clean", "ce_sae", "ce_zero"))
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero_ablation": ce_zero,
        "ce_loss_score": (ce_zero - ce_sae) / max(ce_zero - ce_clean, 1e-12),
        "kl_div": float(totals["kl"]) / count,
        "num_scored_tokens": count,
    }


def eval_token_batches(lm: Any, source: Any, *, batch_size: int = 8, max_tokens: int = 128,
                       max_batches: int | None = None):
    """(input_ids, attention_mask, splice_mask) batches from a corpus, specials not spliced."""
    from emjax.sae import store

    tokenizer = lm.tokenizer
    special = set(tokenizer.special_ids) | set(tokenizer.eos_ids)
    if tokenizer.bos_id is not None:
        special.add(tokenizer.bos_id)
    documents = store.iter_documents(source)
    for index, (input_ids, mask) in enumerate(
        store.token_batches(tokenizer, documents, batch_size, max_tokens)
    ):
        if max_batches is not None and index >= max_batches:
            return
        yield input_ids, mask, store.keep_mask(input_ids, mask, special)
