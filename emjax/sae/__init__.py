"""Sparse autoencoders: TopK SAE (sae), training (train), harvesting (store), evals, files.

    from emjax.sae import sae as sae_lib, files
    config, params, meta = files.load_sae("runs/sae_quick/sae")   # SAELens or sparsify dir
    acts, latent_ids = sae_lib.encode(params, config, residual)   # [B, D] -> [B, k], [B, k]

See docs/sae.md.
"""
