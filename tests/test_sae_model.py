"""TopK SAE math against NumPy / dense references, AuxK, BatchTopK, and synthetic recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emjax.sae import sae as sae_lib
from emjax.sae import train as train_lib


def _random_params(config, seed=0):
    rng = np.random.default_rng(seed)
    n, d = config.n_latents, config.d_in
    return sae_lib.SAEParams(
        encoder_w=jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
        encoder_b=jnp.asarray(rng.normal(size=(n,)) * 0.1, jnp.float32),
        decoder_w=sae_lib.normalize_rows(jnp.asarray(rng.normal(size=(n, d)), jnp.float32)),
        decoder_b=jnp.asarray(rng.normal(size=(d,)), jnp.float32),
    )


def _numpy_reconstruct(params, k, x):
    """Textbook TopK SAE in NumPy: dense latents, dense decode."""
    w_enc = np.asarray(params.encoder_w, np.float64)
    pre = (x - np.asarray(params.decoder_b)) @ w_enc.T + np.asarray(params.encoder_b)  # [B, N]
    latents = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    rows = np.arange(x.shape[0])[:, None]
    latents[rows, top] = np.maximum(pre[rows, top], 0.0)
    x_hat = latents @ np.asarray(params.decoder_w, np.float64) + np.asarray(params.decoder_b)
    return latents, x_hat


def test_encode_decode_match_numpy_reference():
    config = sae_lib.SAEConfig(d_in=16, n_latents=64, k=5)
    params = _random_params(config)
    # shift biases down so some tokens' top-k include negative pre-activations (ReLU bites)
    params = params.replace(encoder_b=params.encoder_b - 8.0)
    x = np.random.default_rng(1).normal(size=(32, 16)).astype(np.float32)
    acts, ids = sae_lib.encode(params, config, jnp.asarray(x))
    dense = np.asarray(sae_lib.dense_latents(acts, ids, config.n_latents))
    ref_latents, ref_x_hat = _numpy_reconstruct(params, config.k, x)
    np.testing.assert_allclose(dense, ref_latents, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(sae_lib.reconstruct(params, config, jnp.asarray(x))), ref_x_hat,
        rtol=1e-4, atol=1e-4,
    )
    # ReLU after top-k: some selected latents are negative pre-activations -> exactly 0
    assert (np.asarray(acts) == 0).any() and (np.asarray(acts) >= 0).all()


def test_gather_decode_equals_dense_decode():
    config = sae_lib.SAEConfig(d_in=12, n_latents=40, k=7)
    params = _random_params(config, seed=3)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(20, 12)), jnp.float32)
    acts, ids = sae_lib.encode(params, config, x)
    dense = sae_lib.dense_latents(acts, ids, config.n_latents)
    np.testing.assert_allclose(
        sae_lib.decode(params, acts, ids), sae_lib.decode_dense(params, dense), rtol=1e-5, atol=1e-5
    )


def _dense_reference_loss(params, config, x, dead_mask):
    """Same loss with dense [B, N] latents and plain autodiff (no custom VJP, no gather)."""
    pre = (x - params.decoder_b) @ params.encoder_w.T + params.encoder_b  # [B, N]
    kth = jax.lax.stop_gradient(jax.lax.top_k(pre, config.k)[0][:, -1:])
    latents = jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)
    x_hat = latents @ params.decoder_w + params.decoder_b
    fvu = jnp.sum((x - x_hat) ** 2) / jnp.sum((x - x.mean(0)) ** 2)
    error = jax.lax.stop_gradient(x - x_hat)
    dead_pre = jnp.where(dead_mask, pre, -1e30)
    aux_kth = jax.lax.stop_gradient(jax.lax.top_k(dead_pre, config.aux_k)[0][:, -1:])
    aux_latents = jnp.where((dead_pre >= aux_kth) & dead_mask, jax.nn.relu(pre), 0.0)
    error_hat = aux_latents @ params.decoder_w
    aux = jnp.sum((error - error_hat) ** 2) / jnp.sum((error - error.mean(0)) ** 2)
    return fvu + config.aux_coef * jnp.where(dead_mask.any(), aux, 0.0)


@pytest.mark.parametrize("num_dead", [0, 9])
def test_sparse_backward_matches_dense_autodiff(num_dead):
    config = sae_lib.SAEConfig(d_in=10, n_latents=48, k=4, k_aux=6)
    params = _random_params(config, seed=5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(24, 10)), jnp.float32)
    dead_mask = jnp.arange(config.n_latents) < num_dead
    grads = jax.grad(lambda p: sae_lib.loss_fn(p, config, x, dead_mask)[0])(params)
    ref = jax.grad(lambda p: _dense_reference_loss(p, config, x, dead_mask))(params)
    for name in ("encoder_w", "encoder_b", "decoder_w", "decoder_b"):
        np.testing.assert_allclose(
            getattr(grads, name), getattr(ref, name), rtol=2e-4, atol=1e-6, err_msg=name
        )
    if num_dead:  # dead latents get encoder gradient only through AuxK
        assert float(jnp.abs(grads.encoder_w[:num_dead]).sum()) > 0


def test_auxk_zero_when_nothing_dead_and_positive_when_forced_dead():
    config = sae_lib.SAEConfig(d_in=16, n_latents=64, k=4, k_aux=8)
    params = _random_params(config, seed=7)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(32, 16)), jnp.float32)
    _, alive = sae_lib.loss_fn(params, config, x, jnp.zeros((64,), bool))
    assert float(alive["aux_loss"]) == 0.0
    _, forced = sae_lib.loss_fn(params, config, x, jnp.arange(64) >= 32)
    assert float(forced["aux_loss"]) > 0.0


def test_decoder_rows_stay_unit_norm_and_parallel_grad_removed():
    config = sae_lib.SAEConfig(d_in=16, n_latents=64, k=4, dead_tokens=64)
    rng = np.random.default_rng(9)
    sample = rng.normal(size=(256, 16)).astype(np.float32) * 3.0
    optimizer = train_lib.make_optimizer(1e-2, warmup_steps=1)
    state = train_lib.init_state(config, optimizer, sample)
    step = jax.jit(lambda s, b: train_lib.train_step(s, b, config=config, optimizer=optimizer))
    for i in range(5):
        state, metrics = step(state, jnp.asarray(sample[i * 32:(i + 1) * 32]))
    norms = np.linalg.norm(np.asarray(state.params.decoder_w), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    grad = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    cleaned = sae_lib.remove_parallel_grad(grad, state.params.decoder_w)
    np.testing.assert_allclose(
        jnp.sum(cleaned * state.params.decoder_w, axis=1), 0.0, atol=1e-5
    )
    # mean ||s x|| = sqrt(d) after input scaling
    scaled_norm = np.linalg.norm(sample * float(state.input_scale), axis=1).mean()
    assert scaled_norm == pytest.approx(4.0, rel=1e-4)


def test_dead_latents_tracked_and_reported():
    config = sae_lib.SAEConfig(d_in=8, n_latents=32, k=2, dead_tokens=40)
    sample = np.random.default_rng(10).normal(size=(64, 8)).astype(np.float32)
    optimizer = train_lib.make_optimizer(1e-3, warmup_steps=1)
    state = train_lib.init_state(config, optimizer, sample)
    # force latents 0..15 to never fire: very negative encoder bias
    params = state.params.replace(encoder_b=state.params.encoder_b.at[:16].set(-1e6))
    state = state.replace(params=params)
    step = jax.jit(lambda s, b: train_lib.train_step(s, b, config=config, optimizer=optimizer))
    batch = jnp.asarray(sample[:32])
    state, metrics = step(state, batch)  # 32 tokens seen: nobody dead yet
    assert float(metrics["dead_frac"]) == 0.0 and float(metrics["aux_loss"]) == 0.0
    state, metrics = step(state, batch)  # counter 32 < 40 before this step
    state, metrics = step(state, batch)  # 64 >= 40: the 16 silenced latents are dead
    assert float(metrics["dead_frac"]) >= 0.5
    assert float(metrics["aux_loss"]) > 0.0


def test_fold_input_scale_gives_same_reconstruction_on_raw_inputs():
    config = sae_lib.SAEConfig(d_in=16, n_latents=48, k=6)
    params = _random_params(config, seed=11)
    scale = 0.37
    x_raw = jnp.asarray(np.random.default_rng(12).normal(size=(20, 16)) * 5, jnp.float32)
    x_hat_scaled = sae_lib.reconstruct(params, config, x_raw * scale)
    folded = sae_lib.fold_input_scale(params, scale)
    np.testing.assert_allclose(
        sae_lib.reconstruct(folded, config, x_raw), x_hat_scaled / scale, rtol=1e-4, atol=1e-4
    )
    acts, ids = sae_lib.encode(params, config, x_raw * scale)
    folded_acts, folded_ids = sae_lib.encode(folded, config, x_raw)
    np.testing.assert_array_equal(ids, folded_ids)
    np.testing.assert_allclose(folded_acts, acts / scale, rtol=1e-4, atol=1e-5)


def test_batch_topk_keeps_batch_k_largest():
    config = sae_lib.SAEConfig(d_in=16, n_latents=64, k=3, batch_topk=True, batch_topk_cap=4)
    params = _random_params(config, seed=13)
    x = np.random.default_rng(14).normal(size=(10, 16)).astype(np.float32)
    acts, ids = sae_lib.encode(params, config, jnp.asarray(x))
    assert acts.shape == (10, 12)
    assert int((np.asarray(acts) > 0).sum()) == 10 * 3  # B*k active in total
    # they are the B*k largest positive pre-activations among each token's top-12
    ref_latents, _ = _numpy_reconstruct(params, 12, x)
    threshold = np.sort(ref_latents.reshape(-1))[-30]
    ref_latents[ref_latents < threshold] = 0.0
    dense = np.asarray(sae_lib.dense_latents(acts, ids, 64))
    np.testing.assert_allclose(dense, ref_latents, rtol=1e-4, atol=1e-4)


def test_geometric_median_resists_outliers():
    points = np.concatenate([np.zeros((50, 3)), np.full((3, 3), 1000.0)]).astype(np.float32)
    median = np.asarray(sae_lib.geometric_median(jnp.asarray(points)))
    assert np.abs(median).max() < 1.0 < np.abs(points.mean(0)).max()


def synthetic_sparse_data(num_dirs=256, d=64, active=4, seed=0):
    """Tokens made of `active` random unit directions (of num_dirs) with positive weights."""
    dirs = np.random.default_rng(seed).normal(size=(num_dirs, d))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)

    def batch_at(step, batch=1024):
        rng = np.random.default_rng(seed * 100_003 + step)
        chosen = np.argsort(rng.random((batch, num_dirs)), axis=1)[:, :active]
        weights = rng.exponential(1.0, (batch, active)) + 0.5
        return np.einsum("bk,bkd->bd", weights, dirs[chosen]).astype(np.float32)

    return dirs, batch_at


@pytest.mark.slow
def test_sae_recovers_known_sparse_directions():
    dirs, batch_at = synthetic_sparse_data()
    config = sae_lib.SAEConfig(d_in=64, n_latents=512, k=4, dead_tokens=20_000)
    state = train_lib.fit(
        config, batch_at, 400, batch_at(10**6), learning_rate=3e-3, warmup_steps=20,
        progress=False,
    )
    decoder = np.asarray(state.params.decoder_w)
    best_cos = np.abs(dirs @ decoder.T).max(axis=1)  # [num_dirs]
    assert (best_cos > 0.9).mean() > 0.9, f"recovered only {(best_cos > 0.9).mean():.2f}"
    x = jnp.asarray(batch_at(10**6 + 1)) * state.input_scale
    fvu = sae_lib.fraction_of_variance_unexplained(x, sae_lib.reconstruct(state.params, config, x))
    assert float(fvu) < 0.2
