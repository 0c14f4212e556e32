"""`load_model`: one entry point for built-in names, HF directories and GGUF files.

A `LanguageModel` bundles the config, the tokenizer and the split NNX model (graphdef, state).
Its methods call module-level jitted functions with the state as an argument, so every model
of the same architecture and shape shares compiled programs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax import parallel
from emjax.io import gguf as gguf_io
from emjax.io import hf as hf_io
from emjax.io import registry
from emjax.io.tokenizer import Tokenizer, from_gguf_metadata, from_hf_dir
from emjax.models import transformer
from emjax.models.config import ModelConfig, resolve_dtype

STATIC_FORWARD_ARGS = ("capture", "exit_after", "start_layer", "compute_dtype", "return_hidden")


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=STATIC_FORWARD_ARGS)
def jit_forward(graphdef, state, input_ids, attention_mask=None, **kwargs) -> transformer.ForwardOutput:
  """`transformer.forward`, compiled; one cache entry per (graphdef, shapes, static options)."""
  return transformer.forward(graphdef, state, input_ids, attention_mask, **kwargs)


@dataclasses.dataclass
class LanguageModel:
  config: ModelConfig
  tokenizer: Tokenizer | None
  graphdef: nnx.GraphDef
  state: nnx.State
  compute_dtype: Any = jnp.float32
  mesh: jax.sharding.Mesh | None = None
  source: str = ""
  lora: dict | None = None        # {projection: (A [L,In,R], B [L,R,Out], scale [L])} or None
  adapter_path: str | None = None

  @property
  def name(self) -> str:
    """Provenance string for reports: source plus adapter, if any."""
    return self.source + (f"+{self.adapter_path}" if self.adapter_path else "")

  def forward(self, input_ids, attention_mask=None, **kwargs) -> transformer.ForwardOutput:
    kwargs.setdefault("compute_dtype", self.compute_dtype)
    kwargs.setdefault("lora", self.lora)
    if "capture" in kwargs:
      kwargs["capture"] = tuple(kwargs["capture"])
    return jit_forward(self.graphdef, self.state, jnp.asarray(input_ids),
                       None if attention_mask is None else jnp.asarray(attention_mask), **kwargs)

  def logits(self, input_ids, attention_mask=None, *, intervention=None) -> jax.Array:
    """[B, T] token ids (+ [B, T] mask) -> [B, T, V] float32 logits."""
    return self.forward(input_ids, attention_mask, intervention=intervention).logits

  def residuals(self, input_ids, attention_mask=None, *, layers, intervention=None) -> dict[int, jax.Array]:
    """Residual stream after each of `layers` (stops after the last one). -> {layer: [B, T, D]}."""
    layers = tuple(sorted(set(int(l) % self.config.num_layers for l in layers)))
    return self.forward(input_ids, attention_mask, intervention=intervention, capture=layers,
                        exit_after=layers[-1]).captured

  def weights(self) -> dict[str, np.ndarray]:
    """Flat {weight name: host array} in emjax layout (stacked layers, [in, out] matrices)."""
    pure = nnx.to_pure_dict(self.state)
    flat = {k: v for k, v in pure.items() if k != "layers"}
    flat.update(pure["layers"])
    return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}

  def with_state(self, state: nnx.State, **changes) -> "LanguageModel":
    return dataclasses.replace(self, state=state, **changes)


# ----------------------------------------------------------------------------- loading

def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  shapes = {name: (cfg.num_layers, *s) for name, s in transformer.layer_weight_shapes(cfg).items()}
  shapes["embed"] = (cfg.vocab_size, cfg.hidden_size)
  shapes["final_norm"] = (cfg.hidden_size,)
  if not cfg.tie_embeddings:
    shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
  return shapes


def _placer(mesh, param_dtype):
  def place(name: str, array: np.ndarray):
    array = np.asarray(array)
    if array.dtype != param_dtype:
      array = array.astype(param_dtype)
    if mesh is None:
      return jnp.asarray(array)
    return jax.device_put(array, parallel.weight_sharding(mesh, name, array.shape))
  return place


def build_state(cfg: ModelConfig, weights: dict[str, Any], param_dtype=jnp.float32):
  """(graphdef, state) of a Transformer whose weights are `weights` (emjax layout)."""
  graphdef, abstract = nnx.split(transformer.abstract_model(cfg, param_dtype))
  pure = nnx.to_pure_dict(abstract)
  layer_names = set(pure["layers"])
  filled = {"layers": {}}
  for name, value in weights.items():
    if name in layer_names:
      filled["layers"][name] = value
    else:
      filled[name] = value
  nnx.replace_by_pure_dict(abstract, filled)
  return graphdef, abstract


def from_weights(cfg: ModelConfig, weights: dict[str, Any], tokenizer: Tokenizer | None = None, *,
                 dtype=None, param_dtype=None, mesh=None, source: str = "") -> LanguageModel:
  compute = resolve_dtype(dtype)
  param_dtype = resolve_dtype(param_dtype) if param_dtype is not None else compute
  place = _placer(mesh, param_dtype)
  placed = {k: (v if isinstance(v, jax.Array) and v.dtype == param_dtype and mesh is None else place(k, v))
            for k, v in weights.items()}
  graphdef, state = build_state(cfg, placed, param_dtype)
  return LanguageModel(cfg, tokenizer, graphdef, state, compute, mesh, source or cfg.name)


def random_model(cfg: ModelConfig, seed: int = 0, tokenizer: Tokenizer | None = None, *, dtype=None,
                 param_dtype=None, mesh=None) -> LanguageModel:
  """A random-init model of any shape (tests; benchmarks at realistic sizes)."""
  compute = resolve_dtype(dtype)
  param_dtype = resolve_dtype(param_dtype) if param_dtype is not None else compute
  model = transformer.init_model(cfg, seed, param_dtype)
  graphdef, state = nnx.split(model)
  lm = LanguageModel(cfg, tokenizer, graphdef, state, compute, None, f"random:{cfg.name or 'model'}:seed{seed}")
  if mesh is not None:
    lm = from_weights(cfg, lm.weights(), tokenizer, dtype=compute, param_dtype=param_dtype, mesh=mesh,
                      source=lm.source)
  return lm


def load_model(source: str, *, dtype=None, param_dtype=None, mesh=None, adapter: str | None = None) -> LanguageModel:
  """Loads a model for inference or training.

  Args:
    source: a built-in name (`smollm2-135m-instruct`), a HF checkpoint directory (config.json +
      model.safetensors or a sharded index), or a `.gguf` file.
    dtype: compute dtype ("float32" default, "bfloat16").
    param_dtype: storage dtype of the weights (default: same as dtype). Training keeps float32.
    mesh: a `jax.sharding.Mesh`; each weight is placed straight onto its NamedSharding.
    adapter: a LoRA adapter directory saved by emjax's fine-tuning (applied unmerged).
  """
  source = os.fspath(source)
  if source in registry.BUILTIN_FILES:
    path, name = registry.resolve_builtin(source), source
  else:
    path, name = source, ""
  if os.path.isdir(path):
    cfg, _ = hf_io.read_config(path, name=name)
    tok = from_hf_dir(path, cfg.eos_token_ids) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    param_dtype_ = resolve_dtype(param_dtype) if param_dtype is not None else resolve_dtype(dtype)
    weights = hf_io.load_hf_weights(path, cfg, _expected_shapes(cfg), _placer(mesh, param_dtype_))
  elif path.endswith(".gguf") or os.path.isfile(path) and _is_gguf(path):
    reader = gguf_io.open_gguf(path)
    cfg = gguf_io.config_from_gguf(reader, path, name=name)
    _, weights = gguf_io.load_gguf_weights(path, reader, cfg)
    tok = from_gguf_metadata(gguf_io.tokenizer_metadata(reader), where=path)
    if tok.eos_ids:
      cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + tok.eos_ids)))
  elif os.path.exists(path):
    raise ValueError(f"{path}: not a model directory or a .gguf file")
  else:
    raise FileNotFoundError(f"model source {source!r} not found: expected a built-in name "
                            f"({registry.builtin_names()}), a HF directory or a .gguf file")
  expected = _expected_shapes(cfg)
  for k, shape in expected.items():
    if k in weights and tuple(weights[k].shape) != shape:
      raise ValueError(f"{path}: weight {k} has shape {tuple(weights[k].shape)}; expected {shape}")
  lm = from_weights(cfg, weights, tok, dtype=dtype, param_dtype=param_dtype, mesh=mesh, source=name or path)
  if adapter is not None:
    from emjax.models import lora as lora_lib  # the fine-tuning module owns the adapter format
    lm = lora_lib.attach_adapter(lm, adapter)
  return lm


def _is_gguf(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def save_hf(lm: LanguageModel, directory: str, *, dtype: str = "float32") -> str:
  """Exports the model (weights, config, tokenizer) as a transformers-loadable directory."""
  weights = lm.weights()
  if lm.lora is not None:
    from emjax.models import lora as lora_lib
    weights = lora_lib.merge_into_weights(weights, lm.lora)
  hf_io.save_hf_weights(directory, lm.config, weights, dtype)
  if lm.tokenizer is not None:
    lm.tokenizer.to_hf_files(directory)
  return directory
