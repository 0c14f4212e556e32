"""HF checkpoint directories (safetensors) <-> emjax weights.

The whole checkpoint format is the table below: HF tensor name -> (our stacked weight, whether
the matrix is transposed from HF's [out, in] to our [in, out]). Pickle checkpoints
(`pytorch_model.bin`) are refused: unpickling can execute code.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Iterable

import numpy as np

from emjax.models.config import ModelConfig, from_hf_config, to_hf_config

HF_NAME_MAP: dict[str, tuple[str, bool]] = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
    "model.layers.{i}.input_layernorm.weight": ("input_norm", False),
    "model.layers.{i}.self_attn.q_proj.weight": ("q_proj", True),
    "model.layers.{i}.self_attn.k_proj.weight": ("k_proj", True),
    "model.layers.{i}.self_attn.v_proj.weight": ("v_proj", True),
    "model.layers.{i}.self_attn.o_proj.weight": ("o_proj", True),
    "model.layers.{i}.self_attn.q_proj.bias": ("q_bias", False),
    "model.layers.{i}.self_attn.k_proj.bias": ("k_bias", False),
    "model.layers.{i}.self_attn.v_proj.bias": ("v_bias", False),
    "model.layers.{i}.post_attention_layernorm.weight": ("post_attention_norm", False),
    "model.layers.{i}.mlp.gate_proj.weight": ("gate_proj", True),
    "model.layers.{i}.mlp.up_proj.weight": ("up_proj", True),
    "model.layers.{i}.mlp.down_proj.weight": ("down_proj", True),
}

_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in HF_NAME_MAP.items()]
_OURS_TO_HF = {ours: hf for hf, (ours, _) in HF_NAME_MAP.items()}
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def read_config(directory: str, name: str = "") -> tuple[ModelConfig, dict]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no config.json; expected a HF model directory "
                            "(config.json + model.safetensors or model.safetensors.index.json)")
  with open(path) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
  eos_ids = None
  gen_path = os.path.join(directory, "generation_config.json")
  if os.path.isfile(gen_path):  # chat models list their end-of-turn tokens here
    with open(gen_path) as f:
      eos_ids = json.load(f).get("eos_token_id")
  cfg = from_hf_config(hf, name=name or os.path.basename(os.path.normpath(directory)), where=path)
  if eos_ids is not None:
    extra = tuple(eos_ids) if isinstance(eos_ids, list) else (int(eos_ids),)
    cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + extra)))
  return cfg, hf


def safetensors_files(directory: str) -> list[str]:
  """The safetensors shard paths of a checkpoint directory, in order."""
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [s for s in files if not os.path.isfile(os.path.join(directory, s))]
    if missing:
      raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
    return [os.path.join(directory, s) for s in files]
  if os.path.isfile(single):
    return [single]
  found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
  pickles = [p for p in found if p in PICKLE_FILES or p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  if pickles:
    raise ValueError(f"{directory}: only pickle checkpoints ({pickles}) are here; emjax never unpickles "
                     "weights (it can execute code). Convert them to safetensors first, e.g. in Python: "
                     "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
  raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                          f"(found: {found[:20]})")


def iter_tensors(files: Iterable[str]):
  """Yields (file, name, array) for every tensor; bf16 arrives as ml_dtypes.bfloat16."""
  from safetensors import SafetensorError, safe_open
  for path in files:
    try:
      with safe_open(path, framework="flax") as f:
        for name in f.keys():
          yield path, name, np.asarray(f.get_tensor(name))
    except SafetensorError as e:
      raise ValueError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: cannot read safetensors file ({e})") from None


def map_hf_name(name: str) -> tuple[str, int | None, bool] | None:
  """HF tensor name -> (our weight name, layer index or None, transpose) or None if unknown."""
  for pattern, (ours, transpose) in _PATTERNS:
    m = pattern.match(name)
    if m:
      return ours, (int(m.group(1)) if m.groups() else None), transpose
  return None


def load_hf_weights(directory: str, cfg: ModelConfig, expected: dict[str, tuple[int, ...]],
                    place: Callable[[str, np.ndarray], object] = lambda name, x: x) -> dict[str, object]:
  """Reads a checkpoint into emjax's stacked layout.

  `expected` maps our weight names to full shapes (with [L] for per-layer weights); `place`
  puts each finished array on its device/sharding (called once per weight, so a large model
  never holds two copies of a stacked weight on the host).
  """
  files = safetensors_files(directory)
  per_layer: dict[str, list] = {}
  out: dict[str, object] = {}
  sources: dict[str, str] = {}
  for path, name, array in iter_tensors(files):
    mapped = map_hf_name(name)
    if mapped is None:
      if name.endswith("rotary_emb.inv_freq"):
        continue  # a cached buffer some exporters write; recomputed from the config
      raise ValueError(f"{path}: unexpected tensor {name!r} for a {cfg.family} model")
    ours, layer, transpose = mapped
    if ours not in expected:
      if ours == "lm_head" and cfg.tie_embeddings:
        continue  # tied checkpoints sometimes store the head anyway
      raise ValueError(f"{path}: tensor {name!r} does not belong to this config "
                       f"(e.g. a bias on a model without attention_bias)")
    array = array.T if transpose else array
    want = expected[ours][1:] if layer is not None else expected[ours]
    if tuple(array.shape) != tuple(want):
      hf_shape = tuple(reversed(array.shape)) if transpose else tuple(array.shape)
      want_hf = tuple(reversed(want)) if transpose else tuple(want)
      raise ValueError(f"{path}: tensor {name!r} has shape {hf_shape}; expected {want_hf} from config.json")
    if layer is None:
      out[ours] = place(ours, array)
      sources[ours] = path
    else:
      if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"{path}: tensor {name!r} is for layer {layer}, but config.json has {cfg.num_layers} layers")
      per_layer.setdefault(ours, [None] * cfg.num_layers)[layer] = array
  for ours, layers in per_layer.items():
    missing = [i for i, a in enumerate(layers) if a is None]
    if missing:
      hf_name = _OURS_TO_HF[ours].replace("{i}", str(missing[0]))
      raise ValueError(f"{directory}: tensor {hf_name!r} is missing (layers {missing} of {ours})")
    out[ours] = place(ours, np.stack(layers))
  missing = sorted(set(expected) - set(out))
  if missing:
    names = [_OURS_TO_HF[m].replace("{i}", "0") for m in missing]
    raise ValueError(f"{directory}: tensors missing from the checkpoint: {names}")
  return out


def save_hf_weights(directory: str, cfg: ModelConfig, weights: dict[str, np.ndarray], dtype: str = "float32") -> None:
  """Writes config.json + model.safetensors (single file) in transformers' layout."""
  from safetensors.numpy import save_file
  import ml_dtypes
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
  os.makedirs(directory, exist_ok=True)
  tensors: dict[str, np.ndarray] = {}
  for ours, array in weights.items():
    hf = _OURS_TO_HF[ours]
    transpose = HF_NAME_MAP[hf][1]
    array = np.asarray(array)
    if "{i}" in hf:
      for i in range(cfg.num_layers):
        layer = array[i].T if transpose else array[i]
        tensors[hf.replace("{i}", str(i))] = np.ascontiguousarray(layer.astype(np_dtype))
    else:
      tensors[hf] = np.ascontiguousarray((array.T if transpose else array).astype(np_dtype))
  tmp = os.path.join(directory, "model.safetensors.tmp")
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(to_hf_config(cfg, dtype), f, indent=1)
  if cfg.eos_token_ids:
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids),
                 "pad_token_id": cfg.pad_token_id}, f, indent=1)
