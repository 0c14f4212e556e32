"""The decoder-only transformer (Llama / Qwen2 families) as a Flax NNX module.

Layers are *stacked*: every per-layer weight has a leading [L] axis and the forward runs the
blocks with `jax.lax.scan`, so compile time stays flat from 2 to 80 layers.

Hot paths call the module through the pure function `forward(graphdef, state, ...)`: the
weights are an argument of the compiled program, never constants folded into it.

Residual-stream conventions (used by steering, capture, SAEs, diffing):
  * "layer l" means the residual stream *after* block l, i.e. transformers' hidden_states[l + 1];
  * an intervention at layer l is applied to that residual before block l + 1 reads it;
  * `capture=(l, ...)` returns those residuals; `exit_after=l` stops the forward there;
  * `residual_in=h, start_layer=l + 1` resumes the forward from a given layer-l residual.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emjax.models import intervene
from emjax.models.config import ModelConfig

Array = jax.Array

# Names of the stacked per-layer weights, with their shapes. LoRA targets use the same names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def layer_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Per-layer weight shapes (without the leading [L]); matrices are stored [in, out]."""
  d, f, h, k, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  shapes = {
      "input_norm": (d,),
      "q_proj": (d, h * dh),
      "k_proj": (d, k * dh),
      "v_proj": (d, k * dh),
      "o_proj": (h * dh, d),
      "post_attention_norm": (d,),
      "gate_proj": (d, f),
      "up_proj": (d, f),
      "down_proj": (f, d),
  }
  if cfg.attention_bias:
    shapes.update({"q_bias": (h * dh,), "k_bias": (k * dh,), "v_bias": (k * dh,)})
  return shapes


class Layers(nnx.Module):
  """All L decoder blocks' weights, stacked on a leading axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    for name, shape in layer_weight_shapes(cfg).items():
      full = (cfg.num_layers, *shape)
      if name.endswith("norm"):
        value = jnp.ones(full, param_dtype)
      elif name.endswith("bias"):
        value = jnp.zeros(full, param_dtype)
      else:
        value = 0.02 * jax.random.normal(rngs.params(), full, param_dtype)
      setattr(self, name, nnx.Param(value))


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.config = cfg
    self.embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
    self.layers = Layers(cfg, rngs=rngs, param_dtype=param_dtype)
    self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), param_dtype))
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size), param_dtype))

  def __call__(self, input_ids, attention_mask=None, **kwargs) -> "ForwardOutput":
    return apply_layers(self, input_ids, attention_mask, **kwargs)


class ForwardOutput(NamedTuple):
  logits: Array | None          # [B, T, V] float32, None when exit_after is set
  captured: dict[int, Array]    # layer -> [B, T, D] residual after that block
  cache: "KVCache | None"       # updated cache when one was given; this call's keys/values with return_kv
  hidden: Array | None = None   # [B, T, D] final normed hidden state (before the unembedding)


class KVCache(NamedTuple):
  """Keys/values of every layer, heads before positions so attention reads them without a
  transpose (this layout made CPU decoding ~1.5x faster than [L, B, S, K, Dh])."""
  k: Array  # [L, B, K, S, Dh]
  v: Array  # [L, B, K, S, Dh]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def init_model(cfg: ModelConfig, seed: int = 0, param_dtype=jnp.float32) -> Transformer:
  """A randomly initialised model (tests, benchmarks at realistic sizes)."""
  return Transformer(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype)


def abstract_model(cfg: ModelConfig, param_dtype=jnp.float32) -> Transformer:
  """The model's structure with shapes only (no memory), for loaders to fill in."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))


# ----------------------------------------------------------------------------- building blocks

def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """x [..., D] -> same shape; statistics in float32 like the reference implementation."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """[Dh/2] inverse frequencies, including Llama-3 and linear rope scaling."""
  dh = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float64) / dh))
  scaling = cfg.rope_scaling_dict
  if scaling is None:
    return inv_freq.astype(np.float32)
  kind = scaling.get("rope_type")
  if kind == "linear":
    return (inv_freq / float(scaling["factor"])).astype(np.float32)
  if kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(is_mid, mid, scaled).astype(np.float32)
  raise ValueError(f"rope_scaling type {kind!r} is not supported (emjax knows 'linear' and 'llama3')")


def rotary(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotate-half RoPE. x [B, T, N, Dh], positions [B, T] -> [B, T, N, Dh]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq          # [B, T, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Grouped-query attention.

  q [B, T, H, Dh]; k, v [B, K, S, Dh] (heads before positions: the KV-cache layout, so decoding
  reads the cache without transposing it); mask [B, T, S] bool -> [B, T, H, Dh].
  """
  b, t, h, dh = q.shape
  kv_heads = k.shape[1]
  q = q.reshape(b, t, kv_heads, h // kv_heads, dh).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, Dh]
  scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(dh)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bksd->bkgtd", probs, v)                              # [B, K, G, T, Dh]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def _project(x: Array, w: Array, lora: tuple[Array, Array, Array] | None, compute_dtype) -> Array:
  """x [B, T, In] @ w [In, Out], plus a low-rank update (x A) B * scale when LoRA is given."""
  y = jnp.einsum("bti,io->bto", x, w.astype(compute_dtype))
  if lora is not None:
    a, b_, scale = lora                                                   # [In, R], [R, Out], []
    low = jnp.einsum("bti,ir->btr", x, a.astype(compute_dtype))
    y = y + (scale * jnp.einsum("btr,ro->bto", low, b_.astype(compute_dtype))).astype(y.dtype)
  return y


def block(cfg: ModelConfig, h: Array, w: dict[str, Array], lora: dict[str, tuple] | None, *,
          positions: Array, mask: Array, inv_freq: Array, compute_dtype,
          cache_kv: tuple[Array, Array] | None = None, cache_index: Array | None = None,
          prefix_kv: tuple[Array, Array] | None = None, return_kv: bool = False):
  """One decoder block. h [B, T, D] -> ([B, T, D], (k, v) or None).

  The second output is the updated cache buffers when `cache_kv` is given, else this block's own
  keys/values [B, K, T, Dh] when `return_kv`. `prefix_kv` ([B, K, P, Dh] each) are keys/values
  of earlier tokens computed elsewhere (a shared prompt): they come before this call's own
  (`mask` then covers P + T keys)."""
  lora = lora or {}
  b, t, _ = h.shape
  x = rms_norm(h, w["input_norm"], cfg.rms_norm_eps)
  q = _project(x, w["q_proj"], lora.get("q_proj"), compute_dtype)
  k = _project(x, w["k_proj"], lora.get("k_proj"), compute_dtype)
  v = _project(x, w["v_proj"], lora.get("v_proj"), compute_dtype)
  if cfg.attention_bias:
    q = q + w["q_bias"].astype(compute_dtype)
    k = k + w["k_bias"].astype(compute_dtype)
    v = v + w["v_bias"].astype(compute_dtype)
  q = rotary(q.reshape(b, t, cfg.num_heads, cfg.head_dim), positions, inv_freq)
  k = rotary(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), positions, inv_freq)
  k = k.transpose(0, 2, 1, 3)                                                 # [B, K, T, Dh]
  v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(0, 2, 1, 3)   # [B, K, T, Dh]
  new_cache = None
  if cache_kv is not None:
    # cache_kv = (all layers' k [L, B, K, S, Dh], v, this layer's index). The new keys/values are
    # written in place into the carried buffers; attention reads this layer's updated slice.
    ck, cv, layer = cache_kv
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (layer, 0, 0, cache_index, 0))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (layer, 0, 0, cache_index, 0))
    new_cache = (ck, cv)
    k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False).astype(compute_dtype)
    v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False).astype(compute_dtype)
  elif return_kv:
    new_cache = (k, v)
  if prefix_kv is not None:
    k = jnp.concatenate([prefix_kv[0].astype(k.dtype), k], axis=2)           # [B, K, P + T, Dh]
    v = jnp.concatenate([prefix_kv[1].astype(v.dtype), v], axis=2)
  attn = attention(q, k, v, mask).reshape(b, t, cfg.num_heads * cfg.head_dim)
  h = h + _project(attn, w["o_proj"], lora.get("o_proj"), compute_dtype).astype(h.dtype)
  x = rms_norm(h, w["post_attention_norm"], cfg.rms_norm_eps)
  gate = _project(x, w["gate_proj"], lora.get("gate_proj"), compute_dtype)
  up = _project(x, w["up_proj"], lora.get("up_proj"), compute_dtype)
  h = h + _project(jax.nn.silu(gate) * up, w["down_proj"], lora.get("down_proj"), compute_dtype).astype(h.dtype)
  return h, new_cache


def attention_mask_for(attention_mask: Array, segment_ids: Array | None, query_slots: Array,
                       key_slots: Array) -> Array:
  """[B, T, S] bool: a query attends to valid keys at earlier-or-same slots of its own segment.

  attention_mask [B, S] marks valid key slots (padding is False). query_slots [T] / key_slots [S]
  are absolute slot indices, so the same rule serves full sequences and KV-cache decoding.
  """
  causal = key_slots[None, :] <= query_slots[:, None]                     # [T, S]
  mask = causal[None] & attention_mask[:, None, :].astype(bool)           # [B, T, S]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def default_positions(attention_mask: Array) -> Array:
  """[B, T] position ids that count only real tokens, so left padding does not shift RoPE."""
  m = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


# ----------------------------------------------------------------------------- the forward

def _segments(start: int, stop: int, capture: tuple[int, ...]) -> list[tuple[int, int]]:
  """Split blocks [start, stop] into contiguous runs that end at each captured layer."""
  cuts = sorted({c for c in capture if start <= c <= stop} | {stop})
  out, lo = [], start
  for c in cuts:
    out.append((lo, c))
    lo = c + 1
  return out


def apply_layers(model: Transformer, input_ids: Array | None, attention_mask: Array | None = None, *,
                 positions: Array | None = None, segment_ids: Array | None = None,
                 intervention: intervene.Intervention | None = None, generated: Array | None = None,
                 capture: tuple[int, ...] = (), exit_after: int | None = None,
                 residual_in: Array | None = None, start_layer: int = 0,
                 cache: KVCache | None = None, cache_index: Array | None = None,
                 key_mask: Array | None = None, lora: dict[str, tuple] | None = None,
                 compute_dtype=jnp.float32, return_hidden: bool = False,
                 logits_from: int | None = None, return_kv: bool = False,
                 prefix: KVCache | None = None, prefix_mask: Array | None = None) -> ForwardOutput:
  """The full forward. See `forward` for the argument meanings."""
  cfg = model.config
  L = cfg.num_layers
  capture = tuple(sorted({c % L for c in capture}))
  for c in capture:
    if not 0 <= c < L:
      raise ValueError(f"capture layer {c} does not exist (model has {L} layers)")
  stop = L - 1 if exit_after is None else exit_after % L
  if prefix is not None and (prefix_mask is None or positions is None):
    raise ValueError("a prefix needs prefix_mask [B, P] and explicit positions for the new tokens")

  if residual_in is not None:
    h = residual_in.astype(compute_dtype)
  else:
    h = jnp.take(model.embed[...], input_ids, axis=0).astype(compute_dtype)   # [B, T, D]
  b, t = h.shape[:2]
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), bool)
  attention_mask = attention_mask.astype(bool)
  if positions is None:
    positions = default_positions(attention_mask)

  if cache is not None:
    if cache_index is None:
      raise ValueError("cache_index is required with a KV cache")
    max_len = cache.k.shape[3]
    query_slots = cache_index + jnp.arange(t)
    key_slots = jnp.arange(max_len)
    if key_mask is None:
      raise ValueError("key_mask [B, S] (valid cache slots, new tokens included) is required with a KV cache")
    mask = attention_mask_for(key_mask, None, query_slots, key_slots)
  else:
    slots = jnp.arange(t)
    mask = attention_mask_for(attention_mask, segment_ids, slots, slots)
  if prefix is not None:
    p = prefix.k.shape[3]
    mask = jnp.concatenate([jnp.broadcast_to(prefix_mask.astype(bool)[:, None, :], (b, t, p)), mask], axis=-1)

  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  weights = {name: getattr(model.layers, name)[...] for name in layer_weight_shapes(cfg)}
  pos_weight = None
  if intervention is not None:
    gen = jnp.zeros((b, t), bool) if generated is None else generated
    pos_weight = intervene.position_weights(intervention, gen)

  def run(h, lo, hi, cache_kv):
    """Blocks lo..hi. The KV cache (if any) rides in the scan carry so updates are in place."""
    xs = {"w": {n: a[lo:hi + 1] for n, a in weights.items()}, "layer": jnp.arange(lo, hi + 1)}
    if lora is not None:
      xs["lora"] = {n: (a[lo:hi + 1], bb[lo:hi + 1], s[lo:hi + 1]) for n, (a, bb, s) in lora.items()}
    if intervention is not None:
      xs["iv"] = (intervention.steer_vec[lo:hi + 1], intervention.steer_scale[lo:hi + 1],
                  intervention.ablate_dirs[lo:hi + 1])
    if prefix is not None:
      xs["prefix"] = (prefix.k[lo:hi + 1], prefix.v[lo:hi + 1])

    def body(carry, x):
      h, cache_kv = carry
      layer_cache = None if cache_kv is None else (*cache_kv, x["layer"])
      h, kv = block(cfg, h, x["w"], x.get("lora"), positions=positions, mask=mask, inv_freq=inv_freq,
                    compute_dtype=compute_dtype, cache_kv=layer_cache, cache_index=cache_index,
                    prefix_kv=x.get("prefix"), return_kv=return_kv)
      if "iv" in x:
        vec, scale, dirs = x["iv"]
        h = intervene.apply(h, vec, scale, dirs, pos_weight)
      if return_kv:
        return (h, None), kv                                              # stacked by the scan: [L, ...]
      return (h, kv), None

    (h, cache_kv), emitted = jax.lax.scan(body, (h, cache_kv), xs)
    return h, (emitted if return_kv else cache_kv)

  special = [name for name, used in (("cache", cache is not None), ("return_kv", return_kv),
                                     ("prefix", prefix is not None)) if used]
  if special and (start_layer != 0 or stop != L - 1 or capture):
    raise ValueError(f"{special[0]} is only supported for a full forward without capture/early exit")
  if len(special) > 1:
    raise ValueError(f"{' and '.join(special)} cannot be combined in one forward")
  captured: dict[int, Array] = {}
  cache_kv = None if cache is None else (cache.k, cache.v)
  for lo, hi in _segments(start_layer, stop, capture):
    h, cache_kv = run(h, lo, hi, cache_kv)
    if hi in capture:
      captured[hi] = h
  new_cache = None if cache_kv is None else KVCache(*cache_kv)

  if exit_after is not None:
    return ForwardOutput(None, captured, new_cache)
  if logits_from is not None:
    h = h[:, logits_from:]                                                # [B, T', D]
  hidden = rms_norm(h, model.final_norm[...], cfg.rms_norm_eps)
  head = model.embed[...].T if cfg.tie_embeddings else model.lm_head[...]
  logits = jnp.einsum("btd,dv->btv", hidden, head.astype(compute_dtype), preferred_element_type=jnp.float32)
  return ForwardOutput(logits, captured, new_cache, hidden if return_hidden else None)


def forward(graphdef: nnx.GraphDef, state: nnx.State, input_ids: Array | None,
            attention_mask: Array | None = None, **kwargs) -> ForwardOutput:
  """Pure forward of a split model; jit-friendly (state is an argument, not a constant).

  Args:
    input_ids: [B, T] int32 (ignored when `residual_in` is given).
    attention_mask: [B, T] bool/int, False at padding. Left or right padding both work.
    positions: [B, T] RoPE positions (default: count of real tokens before each one).
    segment_ids: [B, T] ints; tokens attend only within their segment (packed training rows).
    intervention: an `emjax.models.intervene.Intervention` (steer / ablate), traced.
    generated: [B, T] bool, which positions are generated tokens (for where="prompt"/"generated").
    capture: static tuple of layers whose post-block residuals are returned.
    exit_after: static layer after which to stop (no logits; for SAE harvesting).
    residual_in, start_layer: resume from a given residual [B, T, D] at block `start_layer`.
    cache, cache_index, key_mask: KV-cache decoding (see emjax.sampling).
    return_kv: static; also return this call's keys/values as `cache` (KVCache of [L, B, K, T, Dh]).
    prefix, prefix_mask: keys/values of P earlier tokens (a KVCache of [L, B, K, P, Dh], e.g. a
      shared prompt's from `return_kv`) and their validity [B, P]; this call's tokens attend to
      them first. Needs explicit `positions`. Differentiable: GRPO runs each prompt once per group.
    lora: {projection: (A [L, In, R], B [L, R, Out], scale [L])} low-rank updates.
    compute_dtype: float32 or bfloat16 activations/matmuls (weights are cast at use).
    logits_from: static; logits (and the returned hidden) only for positions logits_from..T-1
      (a Python slice start, -1 = the last): a prefill needs the last position, an RL loss the
      completion; unembedding every position is ~20% of a 135M model's FLOPs.
  """
  model = nnx.merge(graphdef, state)
  return model(input_ids, attention_mask, **kwargs)


def count_params(state: nnx.State) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state))


def weights_dict(state: nnx.State) -> dict[str, Any]:
  """Plain nested dict of arrays (for savers and name-map tables)."""
  return nnx.to_pure_dict(state)
