"""SAE files: our save/load, SAELens (v5 and v6 layouts) and sparsify reads, bad-input errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from emjax.sae import files
from emjax.sae import sae as sae_lib


def _params(config, seed=0):
    rng = np.random.default_rng(seed)
    return sae_lib.SAEParams(
        encoder_w=jnp.asarray(rng.normal(size=(config.n_latents, config.d_in)), jnp.float32),
        encoder_b=jnp.asarray(rng.normal(size=(config.n_latents,)), jnp.float32),
        decoder_w=sae_lib.normalize_rows(
            jnp.asarray(rng.normal(size=(config.n_latents, config.d_in)), jnp.float32)
        ),
        decoder_b=jnp.asarray(rng.normal(size=(config.d_in,)), jnp.float32),
    )


CONFIG = sae_lib.SAEConfig(d_in=12, n_latents=48, k=5, k_aux=7)
X = np.random.default_rng(42).normal(size=(30, 12)).astype(np.float32) * 4


def test_save_load_roundtrip_gives_identical_encodings(tmp_path):
    params = _params(CONFIG)
    scale = 0.5
    files.save_sae(str(tmp_path), CONFIG, params, input_scale=scale, model_name="tiny", layer=2)
    config, loaded, meta = files.load_sae(str(tmp_path))
    assert config == CONFIG
    assert meta["layer"] == 2 and meta["model_name"] == "tiny" and meta["format"] == "saelens"
    # the file takes raw inputs: encode(raw) == encode(scaled) / scale with the same latents
    acts, ids = sae_lib.encode(params, CONFIG, jnp.asarray(X * scale))
    loaded_acts, loaded_ids = sae_lib.encode(loaded, config, jnp.asarray(X))
    np.testing.assert_array_equal(loaded_ids, ids)
    np.testing.assert_allclose(loaded_acts, acts / scale, rtol=1e-5, atol=1e-5)
    # SAELens layout on disk
    with open(tmp_path / "cfg.json") as handle:
        cfg = json.load(handle)
    assert cfg["architecture"] == "topk" and cfg["d_sae"] == 48 and cfg["k"] == 5
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"


def test_reads_saelens_v5_layout_written_by_hand(tmp_path):
    params = _params(CONFIG, seed=1)
    save_file(
        {
            "W_enc": np.asarray(params.encoder_w).T.copy(),
            "W_dec": np.asarray(params.decoder_w),
            "b_enc": np.asarray(params.encoder_b),
            "b_dec": np.asarray(params.decoder_b),
        },
        str(tmp_path / "sae_weights.safetensors"),
    )
    cfg = {"d_in": 12, "d_sae": 48, "model_name": "m", "hook_name": "blocks.7.hook_resid_post",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
           "apply_b_dec_to_input": True, "normalize_activations": "none"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    config, loaded, meta = files.load_sae(str(tmp_path))
    assert (config.k, config.n_latents, meta["layer"]) == (5, 48, 7)
    # NumPy reference of SAELens TopK encode: relu(topk((x - b_dec) @ W_enc + b_enc))
    pre = (X - np.asarray(params.decoder_b)) @ np.asarray(params.encoder_w).T + np.asarray(params.encoder_b)
    ref = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :5]
    rows = np.arange(len(X))[:, None]
    ref[rows, top] = np.maximum(pre[rows, top], 0)
    acts, ids = sae_lib.encode(loaded, config, jnp.asarray(X))
    np.testing.assert_allclose(sae_lib.dense_latents(acts, ids, 48), ref, rtol=1e-4, atol=1e-4)


def test_reads_sparsify_layout(tmp_path):
    params = _params(CONFIG, seed=2)
    hook_dir = tmp_path / "layers.3"
    hook_dir.mkdir()
    save_file(
        {
            "encoder.weight": np.asarray(params.encoder_w),
            "encoder.bias": np.asarray(params.encoder_b),
            "W_dec": np.asarray(params.decoder_w),
            "b_dec": np.asarray(params.decoder_b),
        },
        str(hook_dir / "sae.safetensors"),
    )
    (hook_dir / "cfg.json").write_text(json.dumps(
        {"activation": "topk", "expansion_factor": 4, "normalize_decoder": True, "num_latents": 0,
         "k": 5, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": 12}
    ))
    config, loaded, meta = files.load_sae(str(hook_dir))
    assert (config.n_latents, config.k, meta["layer"], meta["format"]) == (48, 5, 3, "sparsify")
    np.testing.assert_array_equal(
        sae_lib.encode(loaded, config, jnp.asarray(X))[1],
        sae_lib.encode(params, CONFIG, jnp.asarray(X))[1],
    )


def test_corrupt_and_mismatched_files_give_clear_errors(tmp_path):
    files.save_sae(str(tmp_path), CONFIG, _params(CONFIG), layer=1)
    # truncated weights
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="sae_weights.safetensors: not a readable safetensors"):
        files.load_sae(str(tmp_path))
    # wrong tensor shape
    save_file({"W_enc": np.zeros((12, 47), np.float32), "W_dec": np.zeros((48, 12), np.float32),
               "b_enc": np.zeros(48, np.float32), "b_dec": np.zeros(12, np.float32)}, str(weights))
    with pytest.raises(ValueError, match=r"'W_enc' has shape \(12, 47\), expected \(12, 48\)"):
        files.load_sae(str(tmp_path))
    # broken JSON
    (tmp_path / "cfg.json").write_text("{ not json")
    with pytest.raises(ValueError, match="cfg.json: not valid JSON"):
        files.load_sae(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no SAE config"):
        files.load_sae(str(tmp_path / "nowhere"))


def test_check_matches_model_rejects_wrong_width_and_layer():
    meta = {"layer": 4}
    assert files.check_matches_model(CONFIG, meta, hidden_size=12, num_layers=6) == 4
    with pytest.raises(ValueError, match="d_in=12 but the model's residual width is 576"):
        files.check_matches_model(CONFIG, meta, hidden_size=576, num_layers=30)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        files.check_matches_model(CONFIG, meta, hidden_size=12, num_layers=6, layer=9)
