"""Model configuration: one frozen dataclass for every decoder family emjax runs.

Llama (SmolLM2, Llama 3.x with its rope scaling, Mistral-style) and Qwen2 (Qwen2.5, which adds
q/k/v biases) share one architecture: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.
The differences are fields here, not code paths.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str                    # "llama" | "qwen2" | "mistral" (mistral runs as llama)
  vocab_size: int
  hidden_size: int               # D
  intermediate_size: int         # F
  num_layers: int                # L
  num_heads: int                 # H
  num_kv_heads: int              # K (K < H is grouped-query attention)
  head_dim: int                  # Dh
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of HF's rope_scaling
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  attention_bias: bool = False   # q/k/v biases (Qwen2)
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  name: str = ""                 # human-readable provenance, e.g. "smollm2-135m-instruct"

  def __post_init__(self):
    if self.family not in SUPPORTED_FAMILIES:
      raise ValueError(f"model family {self.family!r} is not supported; emjax runs {SUPPORTED_FAMILIES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @property
  def num_params(self) -> int:
    d, f, l, v = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
    q = d * self.num_heads * self.head_dim
    kv = 2 * d * self.num_kv_heads * self.head_dim
    per_layer = q + kv + self.num_heads * self.head_dim * d + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_embeddings else 2) + l * per_layer + d

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def _as_tuple(x) -> tuple[int, ...]:
  if x is None:
    return ()
  return tuple(x) if isinstance(x, (list, tuple)) else (int(x),)


def from_hf_config(hf: dict[str, Any], *, name: str = "", where: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a transformers `config.json` dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_FAMILIES:
    raise ValueError(
        f"{where}: model_type={model_type!r} is not supported; emjax loads {SUPPORTED_FAMILIES} "
        "(Llama, SmolLM2, Llama 3.x, Mistral, Qwen2/2.5)")
  try:
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    scaling = hf.get("rope_scaling")
    rope_theta = hf.get("rope_theta")
    rope_params = hf.get("rope_parameters")  # transformers >= 5 nests rope settings here
    if isinstance(rope_params, dict):
      rope_theta = rope_params.get("rope_theta", rope_theta)
      if rope_params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if scaling is not None:
      scaling = dict(scaling)
      rope_type = scaling.get("rope_type", scaling.get("type", "default"))
      scaling = None if rope_type == "default" else tuple(sorted(
          (k, tuple(v) if isinstance(v, list) else v) for k, v in {**scaling, "rope_type": rope_type}.items()
          if k != "type"))
    return ModelConfig(
        family="llama" if model_type == "mistral" else model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        name=name,
    )
  except KeyError as missing:
    raise ValueError(f"{where}: required field {missing} is missing from the model config") from None


def to_hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """The transformers `config.json` for `cfg`, so an exported model reloads in transformers."""
  arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.family]
  eos = list(cfg.eos_token_ids)
  out = {
      "architectures": [arch],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rope_theta": cfg.rope_theta,
      "rope_scaling": cfg.rope_scaling_dict,
      "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
      "pad_token_id": cfg.pad_token_id,
      "torch_dtype": dtype,
  }
  if cfg.family == "llama":
    out["attention_bias"] = cfg.attention_bias
    out["mlp_bias"] = False
  return out


def dumps(cfg: ModelConfig) -> str:
  return json.dumps(dataclasses.asdict(cfg), indent=1, sort_keys=True)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> Any:
  """Accepts None, a name ("bfloat16") or a dtype; returns a jnp dtype (default float32)."""
  if dtype is None:
    return jnp.float32
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]
  return jnp.dtype(dtype)
