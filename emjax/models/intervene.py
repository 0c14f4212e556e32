"""Interventions on the residual stream, as data.

An `Intervention` is a small pytree of arrays that the forward reads after every block:

  residual <- residual + steer_scale[l] * steer_vec[l] * position_weight      (steer)
  residual <- residual - sum_k <residual, u_lk> u_lk                           (ablate)

Because vectors, scales and directions are traced arrays (dense over all layers, zero where
nothing happens), a sweep over steering strengths, layers or directions reuses one compiled
program. Only the number of ablation directions is a shape.

Where steering applies is data too: `where_prompt` and `where_generated` are 0/1 weights for
prompt tokens and generated tokens (the forward is told which positions were generated).

Capture and early exit are static options of the forward itself (`capture=`, `exit_after=`),
not part of this pytree, because they change the program's outputs.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from emjax.models.config import ModelConfig

WHERE = ("all", "prompt", "generated")


@struct.dataclass
class Intervention:
  steer_vec: jax.Array      # [L, D] vector added after block l (zeros: no steering there)
  steer_scale: jax.Array    # [L] multiplier of steer_vec (a sweep changes only this)
  ablate_dirs: jax.Array    # [L, K, D] unit directions projected out after block l (zeros: none)
  where_prompt: jax.Array   # [] 1.0 to steer prompt tokens, 0.0 not to
  where_generated: jax.Array  # [] 1.0 to steer generated tokens, 0.0 not to

  @property
  def num_layers(self) -> int:
    return self.steer_vec.shape[0]


def _check_layer(cfg: ModelConfig, layer: int) -> int:
  if not -cfg.num_layers <= layer < cfg.num_layers:
    raise ValueError(f"layer {layer} does not exist: the model has {cfg.num_layers} layers (0..{cfg.num_layers - 1})")
  return layer % cfg.num_layers


def _check_vector(cfg: ModelConfig, vector, what: str) -> np.ndarray:
  vector = np.asarray(vector, np.float32)
  if vector.shape != (cfg.hidden_size,):
    raise ValueError(f"{what} has shape {vector.shape}; expected ({cfg.hidden_size},), the model's hidden size")
  return vector


def empty(cfg: ModelConfig, num_ablate: int = 0) -> Intervention:
  """An intervention that changes nothing (but has the shapes of one that could)."""
  L, D = cfg.num_layers, cfg.hidden_size
  return Intervention(
      steer_vec=jnp.zeros((L, D), jnp.float32),
      steer_scale=jnp.zeros((L,), jnp.float32),
      ablate_dirs=jnp.zeros((L, num_ablate, D), jnp.float32),
      where_prompt=jnp.ones((), jnp.float32),
      where_generated=jnp.ones((), jnp.float32),
  )


def _where_weights(where: str) -> tuple[float, float]:
  if where not in WHERE:
    raise ValueError(f"where={where!r}; expected one of {WHERE}")
  return float(where in ("all", "prompt")), float(where in ("all", "generated"))


def steer(cfg: ModelConfig, layer: int | Sequence[int], vector, scale: float = 1.0,
          where: str = "all") -> Intervention:
  """Adds `scale * vector` to the residual after `layer` (or each of several layers)."""
  layers = [layer] if isinstance(layer, int) else list(layer)
  vector = _check_vector(cfg, vector, "steering vector")
  vec = np.zeros((cfg.num_layers, cfg.hidden_size), np.float32)
  scales = np.zeros((cfg.num_layers,), np.float32)
  for l in layers:
    l = _check_layer(cfg, l)
    vec[l] = vector
    scales[l] = scale
  wp, wg = _where_weights(where)
  return empty(cfg).replace(steer_vec=jnp.asarray(vec), steer_scale=jnp.asarray(scales),
                            where_prompt=jnp.float32(wp), where_generated=jnp.float32(wg))


def ablate(cfg: ModelConfig, layer: int | Sequence[int] | str, direction) -> Intervention:
  """Projects `direction` (normalised here) out of the residual after the given layer(s).

  `layer="all"` ablates after every block, the usual directional-ablation setting.
  """
  layers = range(cfg.num_layers) if layer == "all" else ([layer] if isinstance(layer, int) else list(layer))
  direction = _check_vector(cfg, direction, "ablation direction")
  norm = float(np.linalg.norm(direction))
  if norm == 0.0:
    raise ValueError("ablation direction is all zeros")
  dirs = np.zeros((cfg.num_layers, 1, cfg.hidden_size), np.float32)
  for l in layers:
    dirs[_check_layer(cfg, l), 0] = direction / norm
  return empty(cfg, num_ablate=1).replace(ablate_dirs=jnp.asarray(dirs))


def with_scale(iv: Intervention, scale) -> Intervention:
  """Same steering directions and layers, new strength: every layer with a non-zero steering
  vector gets strength `scale` (so a zero strength can be raised again later).

  Traced-friendly: used inside sweeps so changing the strength never recompiles.
  """
  active = jnp.any(iv.steer_vec != 0, axis=-1).astype(jnp.float32)
  return iv.replace(steer_scale=active * jnp.asarray(scale, jnp.float32))


def combine(*ivs: Intervention | None) -> Intervention | None:
  """Composes interventions: steering vectors add (scales folded in), ablations accumulate."""
  ivs = [iv for iv in ivs if iv is not None]
  if not ivs:
    return None
  if len(ivs) == 1:
    return ivs[0]
  steer_total = sum(iv.steer_vec * iv.steer_scale[:, None] for iv in ivs)
  active = sum((iv.steer_scale != 0).astype(jnp.float32) for iv in ivs)
  where_p = jnp.max(jnp.stack([iv.where_prompt for iv in ivs]))
  where_g = jnp.max(jnp.stack([iv.where_generated for iv in ivs]))
  return Intervention(
      steer_vec=steer_total,
      steer_scale=jnp.minimum(active, 1.0),
      ablate_dirs=jnp.concatenate([iv.ablate_dirs for iv in ivs], axis=1),
      where_prompt=where_p,
      where_generated=where_g,
  )


def apply(residual: jax.Array, steer_vec: jax.Array, steer_scale: jax.Array, ablate_dirs: jax.Array,
          position_weight: jax.Array) -> jax.Array:
  """One layer's intervention. residual [B, T, D]; steer_vec [D]; steer_scale []; ablate_dirs [K, D];
  position_weight [B, T] (how much steering each position gets)."""
  dtype = residual.dtype
  h = residual.astype(jnp.float32)
  h = h + (steer_scale * position_weight)[..., None] * steer_vec
  if ablate_dirs.shape[0]:
    coeffs = jnp.einsum("btd,kd->btk", h, ablate_dirs)     # [B, T, K]
    h = h - jnp.einsum("btk,kd->btd", coeffs, ablate_dirs)
  return h.astype(dtype)


def position_weights(iv: Intervention, generated: jax.Array) -> jax.Array:
  """[B, T] steering weight per position from the prompt/generated switches."""
  g = generated.astype(jnp.float32)
  return iv.where_prompt * (1.0 - g) + iv.where_generated * g
