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
  cache: "KVCache | None"       # the updated cache when one was given
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


def attention_inputs(cfg: ModelConfig, h: Array, w: dict[str, Array], lora: dict[str, tuple], *,
                     positions: Array, inv_freq: Array, compute_dtype) -> tuple[Array, Array, Array]:
  """A block's first half up to attention. h [B, T, D] -> (q [B, T, H, Dh] with RoPE,
  k [B, K, T, Dh] with RoPE, v [B, K, T, Dh])."""
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
  return q, k, v


def block_output(cfg: ModelConfig, h: Array, attn: Array, w: dict[str, Array], lora: dict[str, tuple], *,
                 compute_dtype) -> Array:
  """A block's second half: residual h [B, T, D] + attention output [B, T, H * Dh] -> [B, T, D]
  after the output projection and the MLP."""
  h = h + _project(attn, w["o_proj"], lora.get("o_proj"), compute_dtype).astype(h.dtype)
  x = rms_norm(h, w["post_attention_norm"], cfg.rms_norm_eps)
  gate = _project(x, w["gate_proj"], lora.get("gate_proj"), compute_dtype)
  up = _project(x, w["up_proj"], lora.get("up_proj"), compute_dtype)
  return h + _project(jax.nn.silu(gate) * up, w["down_proj"], lora.get("down_proj"), compute_dtype).astype(h.dtype)


def block(cfg: ModelConfig, h: Array, w: dict[str, Array], lora: dict[str, tuple] | None, *,
          positions: Array, mask: Array, inv_freq: Array, compute_dtype,
          cache_kv: tuple[Array, Array] | None = None, cache_index: Array | None = None):
  """One decoder block. h [B, T, D] -> ([B, T, D], updated cache buffers or None).

  cache_kv = (all layers' k [L, B, K, S, Dh], v, this layer's index): the new keys/values are
  written in place into the carried buffers and attention reads this layer's updated slice
  (`mask` then covers the S cache slots)."""
  lora = lora or {}
  b, t, _ = h.shape
  q, k, v = attention_inputs(cfg, h, w, lora, positions=positions, inv_freq=inv_freq, compute_dtype=compute_dtype)
  new_cache = None
  if cache_kv is not None:
    ck, cv, layer = cache_kv
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (layer, 0, 0, cache_index, 0))
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (layer, 0, 0, cache_index, 0))
    new_cache = (ck, cv)
    k = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False).astype(compute_dtype)
    v = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False).astype(compute_dtype)
  attn = attention(q, k, v, mask).reshape(b, t, cfg.num_heads * cfg.head_dim)
  return block_output(cfg, h, attn, w, lora, compute_dtype=compute_dtype), new_cache


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
                 logits_from: int | None = None) -> ForwardOutput:
  """The full forward. See `forward` for the argument meanings."""
  cfg = model.config
  L = cfg.num_layers
  capture = tuple(sorted({c % L for c in capture}))
  for c in capture:
    if not 0 <= c < L:
      raise ValueError(f"capture layer {c} does not exist (model has {L} layers)")
  stop = L - 1 if exit_after is None else exit_after % L

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

    def body(carry, x):
      h, cache_kv = carry
      layer_cache = None if cache_kv is None else (*cache_kv, x["layer"])
      h, cache_kv = block(cfg, h, x["w"], x.get("lora"), positions=positions, mask=mask, inv_freq=inv_freq,
                          compute_dtype=compute_dtype, cache_kv=layer_cache, cache_index=cache_index)
      if "iv" in x:
        vec, scale, dirs = x["iv"]
        h = intervene.apply(h, vec, scale, dirs, pos_weight)
      return (h, cache_kv), None

    (h, cache_kv), _ = jax.lax.scan(body, (h, cache_kv), xs)
    return h, cache_kv

  if cache is not None and (start_layer != 0 or stop != L - 1 or capture):
    raise ValueError("a KV cache is only supported for a full forward without capture/early exit")
  captured: dict[int, Array] = {}
  cache_kv = None if cache is None else (cache.k, cache.v)
  for lo, hi in _segments(start_layer, stop, capture):
    h, cache_kv = run(h, lo, hi, cache_kv)
    if hi in capture:
      captured[hi] = h
  new_cache = None if cache is None else KVCache(*cache_kv)

  if exit_after is not None:
    return ForwardOutput(None, captured, new_cache)
  if logits_from is not None:
    h = h[:, logits_from:]                                                # [B, T', D]
  hidden = rms_norm(h, model.final_norm[...], cfg.rms_norm_eps)
  return ForwardOutput(unembed(model, hidden, compute_dtype), captured, new_cache, hidden if return_hidden else None)


def unembed(model: Transformer, hidden: Array, compute_dtype) -> Array:
  """Final-normed hidden states [..., D] -> float32 logits [..., V]."""
  head = model.embed[...].T if model.config.tie_embeddings else model.lm_head[...]
  return jnp.einsum("...d,dv->...v", hidden, head.astype(compute_dtype), preferred_element_type=jnp.float32)


def forward_shared_prompts(graphdef: nnx.GraphDef, state: nnx.State, prompt_ids: Array, prompt_mask: Array,
                           ids: Array, attention_mask: Array, *, group_size: int,
                           lora: dict[str, tuple] | None = None, compute_dtype=jnp.float32) -> tuple[Array, Array]:
  """Continuations that share prompts, each prompt computed once (GRPO's G samples of a prompt).

  prompt_ids / prompt_mask [U, P] (left-padded); ids / attention_mask [U * G, C] (right-padded),
  rows g*G .. g*G+G-1 continuing prompt g. Returns float32 logits (the prompt's last position
  [U, V], every continuation position [U * G, C, V]) equal to a forward over the concatenated
  [prompt | continuation] rows, to float rounding.

  Both token sets go through each layer's projections and MLP as ONE matmul of U*P + U*G*C rows
  (two half-size matmuls run ~25% slower on CPU and read every weight twice); only attention
  is per set: prompts causally, continuations over their prompt's keys/values then their own.
  Differentiable; `lora` as in `forward`.
  """
  model = nnx.merge(graphdef, state)
  cfg = model.config
  (u, p), (m, c) = prompt_ids.shape, ids.shape
  if m != u * group_size:
    raise ValueError(f"{m} continuation rows for {u} prompts; expected {u} x group_size={group_size}")
  prompt_mask, attention_mask = prompt_mask.astype(bool), attention_mask.astype(bool)
  row_prompt_mask = jnp.repeat(prompt_mask, group_size, axis=0)                          # [M, P]
  prompt_positions = default_positions(prompt_mask)                                      # [U, P]
  positions = row_prompt_mask.sum(-1, keepdims=True) + jnp.arange(c)[None]             # [M, C]
  prompt_attn_mask = attention_mask_for(prompt_mask, None, jnp.arange(p), jnp.arange(p))  # [U, P, P]
  own = attention_mask_for(attention_mask, None, jnp.arange(c), jnp.arange(c))           # [M, C, C]
  attn_mask = jnp.concatenate([jnp.broadcast_to(row_prompt_mask[:, None, :], (m, c, p)), own], axis=-1)
  flat_positions = jnp.concatenate([prompt_positions.reshape(1, -1), positions.reshape(1, -1)], axis=1)
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  embed = model.embed[...]
  h = jnp.concatenate([jnp.take(embed, prompt_ids.reshape(1, -1), axis=0),
                       jnp.take(embed, ids.reshape(1, -1), axis=0)], axis=1).astype(compute_dtype)  # [1, N, D]
  xs = {"w": {name: getattr(model.layers, name)[...] for name in layer_weight_shapes(cfg)}}
  if lora is not None:
    xs["lora"] = lora
  heads = cfg.num_heads * cfg.head_dim

  def body(h, x):
    lora_l = x.get("lora") or {}
    q, k, v = attention_inputs(cfg, h, x["w"], lora_l, positions=flat_positions, inv_freq=inv_freq,
                               compute_dtype=compute_dtype)               # [1, N, H, Dh], [1, K, N, Dh] x2
    q_p, q_c = q[0, :u * p].reshape(u, p, *q.shape[2:]), q[0, u * p:].reshape(m, c, *q.shape[2:])
    kv_p = [t[0, :, :u * p].reshape(t.shape[1], u, p, -1).transpose(1, 0, 2, 3) for t in (k, v)]  # [U, K, P, Dh]
    kv_c = [t[0, :, u * p:].reshape(t.shape[1], m, c, -1).transpose(1, 0, 2, 3) for t in (k, v)]  # [M, K, C, Dh]
    out_p = attention(q_p, *kv_p, prompt_attn_mask)                                           # [U, P, H, Dh]
    k_c, v_c = (jnp.concatenate([jnp.repeat(a, group_size, axis=0), b], axis=2) for a, b in zip(kv_p, kv_c))
    out_c = attention(q_c, k_c, v_c, attn_mask)                                               # [M, C, H, Dh]
    attn = jnp.concatenate([out_p.reshape(1, u * p, heads), out_c.reshape(1, m * c, heads)], axis=1)
    return block_output(cfg, h, attn, x["w"], lora_l, compute_dtype=compute_dtype), None

  h, _ = jax.lax.scan(body, h, xs)
  last = rms_norm(h[0, p - 1:u * p:p], model.final_norm[...], cfg.rms_norm_eps)            # [U, D]
  rest = rms_norm(h[0, u * p:].reshape(m, c, -1), model.final_norm[...], cfg.rms_norm_eps)  # [M, C, D]
  return unembed(model, last, compute_dtype), unembed(model, rest, compute_dtype)


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
