"""SAE files: the SAELens layout (what emjax writes) and EleutherAI sparsify (read).

SAELens (v6) directory:
    cfg.json                 {"architecture": "topk", "d_in", "d_sae", "k", "dtype",
                              "apply_b_dec_to_input": true, "normalize_activations": "none",
                              "metadata": {"model_name", "hook_name", "hook_layer", ...}}
    sae_weights.safetensors  W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
Older SAELens (v5) kept model_name/hook_name/hook_layer at the top level and k in
``activation_fn_kwargs``; both are read.

sparsify directory (one per hookpoint, e.g. ``layers.6/``):
    cfg.json                 {"num_latents" or "expansion_factor", "k", "d_in", ...}
    sae.safetensors          encoder.weight [N, d_in], encoder.bias [N], W_dec [N, d_in], b_dec
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from emjax.sae import sae as sae_lib

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"


def _hook_name(layer: int | None) -> str | None:
    # TransformerLens name of the residual stream after block `layer` (== our capture point).
    return None if layer is None else f"blocks.{layer}.hook_resid_post"


def save_sae(
    directory: str,
    config: sae_lib.SAEConfig,
    params: sae_lib.SAEParams,
    *,
    input_scale: float = 1.0,
    model_name: str = "",
    layer: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> str:
    """Write the SAE in the SAELens layout, the training input scale folded into the weights.

    The saved SAE takes raw residual-stream activations. Returns ``directory``.
    """
    params = sae_lib.fold_input_scale(params, input_scale)
    os.makedirs(directory, exist_ok=True)
    tensors = {
        "W_enc": np.ascontiguousarray(np.asarray(params.encoder_w, np.float32).T),  # [D, N]
        "W_dec": np.asarray(params.decoder_w, np.float32),  # [N, D]
        "b_enc": np.asarray(params.encoder_b, np.float32),  # [N]
        "b_dec": np.asarray(params.decoder_b, np.float32),  # [D]
    }
    save_file(tensors, os.path.join(directory, SAELENS_WEIGHTS))
    metadata = {
        "model_name": model_name,
        "hook_name": _hook_name(layer),
        "hook_layer": layer,
        "emjax": {
            "k_aux": config.k_aux,
            "dead_tokens": config.dead_tokens,
            "aux_coef": config.aux_coef,
            "batch_topk": config.batch_topk,
            "batch_topk_cap": config.batch_topk_cap,
            **(extra_metadata or {}),
        },
    }
    cfg = {
        "architecture": "topk",
        "d_in": config.d_in,
        "d_sae": config.n_latents,
        "k": config.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": metadata,
    }
    with open(os.path.join(directory, SAELENS_CFG), "w") as handle:
        json.dump(cfg, handle, indent=2)
    return directory


def _read_json(path: str) -> dict:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no SAE config here (expected cfg.json)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: weights file missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def _require(tensors: dict, path: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise ValueError(f"{path}: tensor {name!r} missing; found {sorted(tensors)}")
    array = np.asarray(tensors[name], np.float32)
    if array.shape != shape:
        raise ValueError(f"{path}: tensor {name!r} has shape {array.shape}, expected {shape}")
    return array


def _int_field(cfg: dict, path: str, *names: str) -> int:
    for name in names:
        if isinstance(cfg.get(name), int):
            return cfg[name]
    raise ValueError(f"{path}: integer field {' or '.join(names)} missing")


def load_sae(directory: str) -> tuple[sae_lib.SAEConfig, sae_lib.SAEParams, dict[str, Any]]:
    """Read a SAELens-layout or sparsify directory. Returns (config, params, metadata).

    metadata holds ``model_name``, ``layer`` (int or None), ``format`` and the raw cfg.
    """
    import jax.numpy as jnp

    cfg_path = os.path.join(directory, SAELENS_CFG)
    if os.path.exists(os.path.join(directory, SPARSIFY_WEIGHTS)) and not os.path.exists(
        os.path.join(directory, SAELENS_WEIGHTS)
    ):
        return load_sparsify(directory)
    cfg = _read_json(cfg_path)
    weights_path = os.path.join(directory, SAELENS_WEIGHTS)
    architecture = cfg.get("architecture", "topk")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if architecture != "topk" or not isinstance(k, int):
        raise ValueError(
            f"{cfg_path}: emjax reads TopK SAEs (architecture 'topk' with an integer k); "
            f"got architecture={architecture!r}, k={k!r}"
        )
    d_in = _int_field(cfg, cfg_path, "d_in")
    n_latents = _int_field(cfg, cfg_path, "d_sae")
    if cfg.get("apply_b_dec_to_input") is False:
        raise ValueError(f"{cfg_path}: apply_b_dec_to_input=false is not supported")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r}; "
            "only 'none' is supported (emjax folds its input scale into the weights)"
        )
    tensors = _read_tensors(weights_path)
    params = sae_lib.SAEParams(
        encoder_w=jnp.asarray(_require(tensors, weights_path, "W_enc", (d_in, n_latents)).T),
        encoder_b=jnp.asarray(_require(tensors, weights_path, "b_enc", (n_latents,))),
        decoder_w=jnp.asarray(_require(tensors, weights_path, "W_dec", (n_latents, d_in))),
        decoder_b=jnp.asarray(_require(tensors, weights_path, "b_dec", (d_in,))),
    )
    meta = cfg.get("metadata") or {}
    ours = meta.get("emjax") or {}
    config = sae_lib.SAEConfig(
        d_in=d_in,
        n_latents=n_latents,
        k=k,
        k_aux=ours.get("k_aux"),
        dead_tokens=ours.get("dead_tokens", sae_lib.SAEConfig.dead_tokens),
        aux_coef=ours.get("aux_coef", sae_lib.SAEConfig.aux_coef),
        batch_topk=ours.get("batch_topk", False),
        batch_topk_cap=ours.get("batch_topk_cap", sae_lib.SAEConfig.batch_topk_cap),
    )
    layer = meta.get("hook_layer", cfg.get("hook_layer"))
    hook_name = meta.get("hook_name", cfg.get("hook_name"))
    if layer is None and isinstance(hook_name, str):
        match = re.search(r"(?:blocks|layers)\.(\d+)\.", hook_name)
        layer = int(match.group(1)) if match else None
    metadata = {
        "format": "saelens",
        "model_name": meta.get("model_name", cfg.get("model_name", "")),
        "layer": layer,
        "hook_name": hook_name,
        "cfg": cfg,
    }
    return config, params, metadata


def load_sparsify(directory: str) -> tuple[sae_lib.SAEConfig, sae_lib.SAEParams, dict[str, Any]]:
    """Read an EleutherAI sparsify SAE directory (``cfg.json`` + ``sae.safetensors``).

    The layer comes from a directory name like ``layers.12`` (sparsify's hookpoint naming).
    """
    import jax.numpy as jnp

    cfg_path = os.path.join(directory, SAELENS_CFG)
    weights_path = os.path.join(directory, SPARSIFY_WEIGHTS)
    cfg = _read_json(cfg_path)
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_path}: activation={cfg['activation']!r}; only 'topk' is supported")
    for unsupported in ("skip_connection", "transcode", "multi_topk"):
        if cfg.get(unsupported):
            raise ValueError(f"{cfg_path}: {unsupported}=true is not supported by emjax")
    d_in = _int_field(cfg, cfg_path, "d_in")
    n_latents = cfg.get("num_latents") or d_in * _int_field(cfg, cfg_path, "expansion_factor")
    k = _int_field(cfg, cfg_path, "k")
    tensors = _read_tensors(weights_path)
    params = sae_lib.SAEParams(
        encoder_w=jnp.asarray(_require(tensors, weights_path, "encoder.weight", (n_latents, d_in))),
        encoder_b=jnp.asarray(_require(tensors, weights_path, "encoder.bias", (n_latents,))),
        decoder_w=jnp.asarray(_require(tensors, weights_path, "W_dec", (n_latents, d_in))),
        decoder_b=jnp.asarray(_require(tensors, weights_path, "b_dec", (d_in,))),
    )
    match = re.search(r"(?:layers|h|blocks)\.(\d+)", os.path.basename(os.path.normpath(directory)))
    metadata = {
        "format": "sparsify",
        "model_name": cfg.get("model_name", ""),
        "layer": int(match.group(1)) if match else None,
        "hook_name": os.path.basename(os.path.normpath(directory)),
        "cfg": cfg,
    }
    return sae_lib.SAEConfig(d_in=d_in, n_latents=int(n_latents), k=k), params, metadata


def check_matches_model(
    config: sae_lib.SAEConfig, metadata: dict, hidden_size: int, num_layers: int,
    layer: int | None = None, source: str = "SAE",
) -> int:
    """Raise a clear error when an SAE does not fit a model; returns the layer to use."""
    if config.d_in != hidden_size:
        raise ValueError(
            f"{source}: d_in={config.d_in} but the model's residual width is {hidden_size}; "
            "this SAE was trained on another model"
        )
    layer = layer if layer is not None else metadata.get("layer")
    if layer is None:
        raise ValueError(f"{source}: no layer recorded in the file; pass the layer explicitly")
    if not 0 <= layer < num_layers:
        raise ValueError(f"{source}: layer {layer} does not exist; the model has layers 0..{num_layers - 1}")
    return int(layer)


def load_for_model(path: str, lm: Any, layer: int | None = None) -> tuple[sae_lib.SAEConfig, sae_lib.SAEParams, int]:
    """Load an SAE directory (ours/SAELens, or sparsify) and check it fits `lm`.

    Returns (config, params, layer): `layer` is the one given, else the file's hook layer; a width
    or layer that does not fit the model raises an error naming the file.
    """
    loader = load_sparsify if os.path.isfile(os.path.join(path, "sae.safetensors")) else load_sae
    config, params, metadata = loader(path)
    layer = check_matches_model(config, metadata, lm.config.hidden_size, lm.config.num_layers, layer, source=path)
    return config, params, layer
