"""GGUF files (llama.cpp's format) -> ModelConfig, weights and tokenizer metadata.

Weights are dequantised with the `gguf` package's NumPy code (Q4_0, Q4_1, Q8_0, F16, F32 and
the other types it knows). llama.cpp's converter permutes the rows of Llama-family q/k
projections so that its interleaved RoPE matches HF's rotate-half RoPE; `unpermute_qk` undoes
that, so the weights plug into the same forward as HF checkpoints.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from emjax.models.config import ModelConfig

# GGUF tensor name -> (our stacked weight name, transpose to [in, out]).
# `{i}` is the layer index; names without it are global.
GGUF_NAME_MAP: dict[str, tuple[str, bool]] = {
    "token_embd.weight": ("embed", False),
    "output_norm.weight": ("final_norm", False),
    "output.weight": ("lm_head", True),
    "blk.{i}.attn_norm.weight": ("input_norm", False),
    "blk.{i}.attn_q.weight": ("q_proj", True),
    "blk.{i}.attn_k.weight": ("k_proj", True),
    "blk.{i}.attn_v.weight": ("v_proj", True),
    "blk.{i}.attn_output.weight": ("o_proj", True),
    "blk.{i}.attn_q.bias": ("q_bias", False),
    "blk.{i}.attn_k.bias": ("k_bias", False),
    "blk.{i}.attn_v.bias": ("v_bias", False),
    "blk.{i}.ffn_norm.weight": ("post_attention_norm", False),
    "blk.{i}.ffn_gate.weight": ("gate_proj", True),
    "blk.{i}.ffn_up.weight": ("up_proj", True),
    "blk.{i}.ffn_down.weight": ("down_proj", True),
}

_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in GGUF_NAME_MAP.items()]


def _reader(path: str):
  import gguf  # imported lazily: only needed for GGUF sources
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises assorted errors on a truncated or corrupt file
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                     "is it truncated? re-download or re-convert it") from None


def _field(reader, key: str, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def read_metadata(reader) -> dict[str, Any]:
  """All scalar/string metadata, plus list fields (tokens, merges) as Python lists."""
  return {k: _field(reader, k) for k in reader.fields}


def config_from_gguf(reader, path: str, name: str = "") -> ModelConfig:
  arch = _field(reader, "general.architecture")
  if arch not in ("llama", "qwen2"):
    raise ValueError(f"{path}: general.architecture={arch!r} is not supported (emjax reads llama and qwen2 GGUFs)")

  def need(key):
    value = _field(reader, f"{arch}.{key}")
    if value is None:
      raise ValueError(f"{path}: metadata key {arch}.{key} is missing")
    return value

  heads = int(need("attention.head_count"))
  hidden = int(need("embedding_length"))
  tokens = _field(reader, "tokenizer.ggml.tokens") or []
  vocab = int(_field(reader, f"{arch}.vocab_size") or len(tokens))
  has_output = any(t.name == "output.weight" for t in reader.tensors)
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  rope_dim = _field(reader, f"{arch}.rope.dimension_count")
  return ModelConfig(
      family=arch,
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")),
      num_layers=int(need("block_count")),
      num_heads=heads,
      num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv") or heads),
      head_dim=int(rope_dim or hidden // heads),
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base") or 10000.0),
      rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      tie_embeddings=not has_output,
      attention_bias=arch == "qwen2",
      max_position_embeddings=int(_field(reader, f"{arch}.context_length") or 8192),
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_ids=() if eos is None else (int(eos),),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
      name=name or os.path.basename(path),
  )


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's row permutation of a q/k projection. w [out, in] (HF layout) -> same."""
  out_dim = w.shape[0]
  return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_weights(path: str, reader=None, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Reads and dequantises every tensor into emjax's stacked layout.

  Returns (config, {name: float32 array}) with per-layer weights stacked as [L, ...] and
  matrices stored [in, out].
  """
  import gguf
  reader = reader or _reader(path)
  cfg = cfg or config_from_gguf(reader, path)
  per_layer: dict[str, list] = {}
  flat: dict[str, np.ndarray] = {}
  for tensor in reader.tensors:
    for pattern, (ours, transpose) in _PATTERNS:
      m = pattern.match(tensor.name)
      if m:
        break
    else:
      raise ValueError(f"{path}: unexpected tensor {tensor.name!r}; emjax knows {sorted(GGUF_NAME_MAP)}")
    try:
      w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except Exception as e:
      raise ValueError(f"{path}: cannot dequantise tensor {tensor.name!r} of type "
                       f"{tensor.tensor_type.name} ({e})") from None
    if cfg.family == "llama" and ours in ("q_proj", "k_proj"):
      w = unpermute_qk(w, cfg.num_heads if ours == "q_proj" else cfg.num_kv_heads)
    if cfg.family == "llama" and ours in ("q_bias", "k_bias"):
      w = unpermute_qk(w[:, None], cfg.num_heads if ours == "q_bias" else cfg.num_kv_heads)[:, 0]
    if transpose:
      w = w.T
    if m.groups():
      per_layer.setdefault(ours, [None] * cfg.num_layers)[int(m.group(1))] = w
    else:
      flat[ours] = w
  for name, layers in per_layer.items():
    missing = [i for i, w in enumerate(layers) if w is None]
    if missing:
      raise ValueError(f"{path}: tensor {name} is missing for layers {missing}")
    flat[name] = np.stack(layers)
  return cfg, flat


def tokenizer_metadata(reader) -> dict[str, Any]:
  """The tokenizer fields llama.cpp stores (see emjax.io.tokenizer.from_gguf_metadata)."""
  keys = ["model", "pre", "tokens", "merges", "token_type", "bos_token_id", "eos_token_id",
          "padding_token_id", "unknown_token_id", "add_bos_token", "add_eos_token", "add_space_prefix"]
  meta = {k: _field(reader, f"tokenizer.ggml.{k}") for k in keys}
  meta["chat_template"] = _field(reader, "tokenizer.chat_template")
  return meta


def open_gguf(path: str):
  return _reader(path)
