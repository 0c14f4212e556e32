"""LoRA adapters: spec, init, dropout, merge, save/load.

The transformer forward already applies low-rank updates (`transformer._project`):
`y = x W + (x A) B * scale[l]`, with `lora={projection: (A [L, In, R], B [L, R, Out], scale [L])}`.
This module owns everything around that tuple:

  * the *trainable* adapter pytree `{projection: {"a": [L, In, R], "b": [L, R, Out]}}` (float32);
  * the *frozen* per-layer scales `{projection: [L]}`: alpha / r (or alpha / sqrt(r) for rs-LoRA)
    on adapted layers and 0 elsewhere, so a layer filter is data, not a different program;
  * merging into base weights (HF export), and the on-disk adapter format
    (`adapter_config.json` + an orbax checkpoint of the trainable pytree).

Only the trainable pytree is differentiated and given optimizer state, so AdamW memory is
proportional to the adapter, not to the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax.models.config import ModelConfig
from emjax.models.transformer import PROJECTIONS, layer_weight_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_PARAMS = "params"

# Short names and groups a user may write in `targets`.
_ALIASES: dict[str, tuple[str, ...]] = {
    "all": PROJECTIONS,
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    **{p.removesuffix("_proj"): (p,) for p in PROJECTIONS},
    **{p: (p,) for p in PROJECTIONS},
}

AdapterParams = dict[str, dict[str, jax.Array]]   # {projection: {"a": [L, In, R], "b": [L, R, Out]}}
LayerScales = dict[str, jax.Array]               # {projection: [L]}
ForwardLora = dict[str, tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What to adapt and how. `targets` and `layers` accept the forms of `resolve_targets` / `resolve_layers`."""
  rank: int = 32
  alpha: float = 64.0
  rslora: bool = True                    # scale alpha / sqrt(r) (rank-stabilised) instead of alpha / r
  targets: str | Sequence[str] = "all"
  layers: str | Sequence[int] | None = None  # None / "all" = every layer
  dropout: float = 0.0

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["targets"] = list(self.targets) if not isinstance(self.targets, str) else self.targets
    out["layers"] = list(self.layers) if self.layers is not None and not isinstance(self.layers, str) else self.layers
    return out


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """'q,v' / ['q_proj', 'down'] / 'mlp' / 'all' / a regex like '.*_proj' -> projection names in model order."""
  items = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else [str(t).strip() for t in targets]
  chosen: set[str] = set()
  for item in filter(None, items):
    if item in _ALIASES:
      chosen.update(_ALIASES[item])
      continue
    try:
      matched = {p for p in PROJECTIONS if re.fullmatch(item, p)}
    except re.error:
      matched = set()
    if not matched:
      raise ValueError(f"LoRA target {item!r} matches no projection; use names or patterns over {PROJECTIONS} "
                       f"or the groups {sorted(k for k in _ALIASES if k not in PROJECTIONS)}")
    chosen.update(matched)
  if not chosen:
    raise ValueError(f"LoRA targets {targets!r} select no projection")
  return tuple(p for p in PROJECTIONS if p in chosen)


def resolve_layers(layers: str | Sequence[int] | int | None, num_layers: int) -> tuple[int, ...]:
  """None / 'all' / 24 / '24' / '-1' / '0-5' / '3,7,10-12' / [3, 7] -> sorted layer indices in [0, L)."""
  if layers is None or (isinstance(layers, str) and layers.strip() in ("", "all")):
    return tuple(range(num_layers))
  if isinstance(layers, int):
    layers = [layers]
  if isinstance(layers, str):
    picked: list[int] = []
    for part in filter(None, (p.strip() for p in layers.split(","))):
      match = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
      if match:
        lo, hi = (int(g) % num_layers for g in match.groups())
        picked.extend(range(lo, hi + 1))
      else:
        picked.append(int(part))
    layers = picked
  out = set()
  for layer in layers:
    layer = int(layer)
    if not -num_layers <= layer < num_layers:
      raise ValueError(f"LoRA layer {layer} does not exist (model has {num_layers} layers)")
    out.add(layer % num_layers)
  if not out:
    raise ValueError(f"LoRA layers {layers!r} select no layer")
  return tuple(sorted(out))


def scaling(spec: LoraSpec) -> float:
  """alpha / sqrt(r) for rs-LoRA (Kalajdzievski 2023), alpha / r for classic LoRA."""
  return float(spec.alpha / (np.sqrt(spec.rank) if spec.rslora else spec.rank))


def layer_scales(spec: LoraSpec, cfg: ModelConfig) -> LayerScales:
  """{projection: [L] float32}: the LoRA scale on selected layers, 0 on the others."""
  on = np.zeros(cfg.num_layers, np.float32)
  on[list(resolve_layers(spec.layers, cfg.num_layers))] = scaling(spec)
  return {p: jnp.asarray(on) for p in resolve_targets(spec.targets)}


def init_adapter(spec: LoraSpec, cfg: ModelConfig, key: jax.Array) -> AdapterParams:
  """A uniform(+-1/sqrt(In)) (PEFT's kaiming-uniform bound) and B = 0, so training starts at the base model."""
  if spec.rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
  shapes = layer_weight_shapes(cfg)
  params: AdapterParams = {}
  for index, proj in enumerate(resolve_targets(spec.targets)):
    fan_in, fan_out = shapes[proj]
    bound = 1.0 / np.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, index), (cfg.num_layers, fan_in, spec.rank), jnp.float32,
                           -bound, bound)
    params[proj] = {"a": a, "b": jnp.zeros((cfg.num_layers, spec.rank, fan_out), jnp.float32)}
  return params


def forward_lora(params: AdapterParams, scales: LayerScales) -> ForwardLora:
  """The tuple form the transformer forward reads."""
  return {p: (params[p]["a"], params[p]["b"], scales[p]) for p in params}


def apply_dropout(params: AdapterParams, rate: float, key: jax.Array) -> AdapterParams:
  """Dropout on each adapter's input features: drops rows of A (x * m) A = x (diag(m) A).

  The forward has no per-token hook before A, so the mask [L, In] is shared by every token of
  the step; it still regularises the adapter the way input dropout does, one mask per step.
  """
  if rate <= 0.0:
    return params
  out = {}
  for index, (proj, ab) in enumerate(sorted(params.items())):
    keep = jax.random.bernoulli(jax.random.fold_in(key, index), 1.0 - rate, ab["a"].shape[:2])  # [L, In]
    out[proj] = {"a": ab["a"] * keep[..., None].astype(ab["a"].dtype) / (1.0 - rate), "b": ab["b"]}
  return out


def delta(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """A [L, In, R], B [L, R, Out], scale [L] -> the weight update [L, In, Out] (float32)."""
  a, b, scale = (np.asarray(jax.device_get(x), np.float32) for x in (a, b, scale))
  return np.einsum("lir,lro->lio", a, b) * scale[:, None, None]


def merge_into_weights(weights: dict[str, np.ndarray], lora: ForwardLora) -> dict[str, np.ndarray]:
  """Base weights (emjax layout, stacked [L, In, Out] projections) + LoRA -> merged copy; dtypes kept."""
  merged = dict(weights)
  for proj, (a, b, scale) in lora.items():
    if proj not in weights:
      raise KeyError(f"LoRA adapts {proj!r} but the weights have no such matrix (have {sorted(weights)})")
    base = np.asarray(weights[proj])
    update = delta(a, b, scale)
    if update.shape != base.shape:
      raise ValueError(f"LoRA update for {proj} has shape {update.shape}; base weight is {base.shape}")
    merged[proj] = (base.astype(np.float32) + update).astype(base.dtype)
  return merged


def merge_float32(graphdef, state, lora: ForwardLora) -> tuple[Any, ForwardLora | None]:
  """Traceable: (state with W + scale * A B in every adapted float32 projection, the adapters
  left unmerged). Lower-precision weights keep their adapters (bfloat16 would round a small
  update away).

  For decoding: a merged projection is one matmul per token instead of three, and merging costs
  about one matmul of the weight's size per call (2 x L x In x Out x R FLOPs).
  """
  model = nnx.merge(graphdef, state)
  rest = {}
  for proj, (a, b, scale) in lora.items():
    weight = getattr(model.layers, proj)
    if weight[...].dtype != jnp.float32:
      rest[proj] = (a, b, scale)
      continue
    update = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)                 # [L, In, Out]
    weight[...] = weight[...] + update * scale.astype(jnp.float32)[:, None, None]
  return nnx.state(model), (rest or None)


# ----------------------------------------------------------------------------- files

def save_adapter(directory: str, params: AdapterParams, spec: LoraSpec, cfg: ModelConfig, *,
                 base_model: str = "") -> str:
  """Writes `adapter_config.json` and an orbax checkpoint of the trainable pytree under `directory`."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  meta = {"format": "emjax-lora-v1", "spec": spec.to_json(), "base_model": base_model,
          "targets": list(params), "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
          "shapes": {p: {k: list(v.shape) for k, v in ab.items()} for p, ab in params.items()}}
  target = os.path.join(directory, ADAPTER_PARAMS)
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(target, host, force=True)
  with open(os.path.join(directory, ADAPTER_CONFIG), "w") as f:
    json.dump(meta, f, indent=1)
  return directory


def load_adapter(directory: str, cfg: ModelConfig) -> tuple[AdapterParams, LoraSpec]:
  """Reads an adapter written by `save_adapter`, checking it fits a model with config `cfg`."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, ADAPTER_CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory}: no {ADAPTER_CONFIG}; expected an adapter directory written by "
                            "emjax fine-tuning (workdir/adapter)")
  with open(config_path) as f:
    meta = json.load(f)
  spec_fields = {f.name for f in dataclasses.fields(LoraSpec)}
  spec = LoraSpec(**{k: v for k, v in meta["spec"].items() if k in spec_fields})
  shapes = layer_weight_shapes(cfg)
  abstract = {}
  for proj, ab in meta["shapes"].items():
    fan_in, fan_out = shapes[proj]
    want = {"a": [cfg.num_layers, fan_in, spec.rank], "b": [cfg.num_layers, spec.rank, fan_out]}
    if ab != want:
      raise ValueError(f"{config_path}: adapter for {proj} has shapes {ab}; this model needs {want} "
                       f"(was the adapter trained on another base model? it says {meta.get('base_model')!r})")
    abstract[proj] = {k: jax.ShapeDtypeStruct(tuple(v), jnp.float32) for k, v in ab.items()}
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(os.path.join(directory, ADAPTER_PARAMS), abstract)
  return params, spec


def attach_adapter(lm, path: str):
  """`LanguageModel` + adapter directory -> the same model with `lora` set (applied unmerged)."""
  params, spec = load_adapter(path, lm.config)
  lora = forward_lora(params, layer_scales(spec, lm.config))
  return dataclasses.replace(lm, lora=lora, adapter_path=os.fspath(path))
