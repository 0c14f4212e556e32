"""Meshes and shardings: the same code runs on 2 CPU cores, one GPU or a TPU pod.

Mesh axes emjax uses: `data` (batch), `fsdp` (parameters and optimizer state sharded, batch
too), `model` (tensor parallel: heads / MLP columns / vocabulary). Rules below map each weight
to a PartitionSpec; an axis is used only when it exists in the mesh and divides the dimension.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# weight name -> logical axis per dimension ("fsdp" / "model" / None)
WEIGHT_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("model", "fsdp"),
    "lm_head": ("fsdp", "model"),
    "final_norm": (None,),
    "input_norm": (None, None),
    "post_attention_norm": (None, None),
    "q_proj": (None, "fsdp", "model"),
    "k_proj": (None, "fsdp", "model"),
    "v_proj": (None, "fsdp", "model"),
    "gate_proj": (None, "fsdp", "model"),
    "up_proj": (None, "fsdp", "model"),
    "o_proj": (None, "model", "fsdp"),
    "down_proj": (None, "model", "fsdp"),
    "q_bias": (None, "model"),
    "k_bias": (None, "model"),
    "v_bias": (None, "model"),
}


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  """A mesh over all (or the given) devices. shape e.g. {"data": 2, "model": 4}; -1 fills in."""
  devices = list(devices if devices is not None else jax.devices())
  shape = dict(shape or {"data": len(devices)})
  known = int(np.prod([v for v in shape.values() if v != -1]))
  for k, v in shape.items():
    if v == -1:
      shape[k] = len(devices) // known
  if int(np.prod(list(shape.values()))) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(list(shape.values())))} devices; {len(devices)} available")
  return Mesh(np.asarray(devices).reshape(tuple(shape.values())), tuple(shape.keys()))


def spec_for(mesh: Mesh, logical: Sequence[str | None], shape: Sequence[int]) -> P:
  """PartitionSpec using each logical axis only if the mesh has it and it divides the dim."""
  out = []
  for axis, dim in zip(logical, shape):
    size = mesh.shape.get(axis, 1) if axis else 1
    out.append(axis if axis and size > 1 and dim % size == 0 else None)
  return P(*out)


def weight_sharding(mesh: Mesh, name: str, shape: Sequence[int]) -> NamedSharding:
  logical = WEIGHT_AXES.get(name, (None,) * len(shape))
  return NamedSharding(mesh, spec_for(mesh, logical, shape))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dim over every data-like axis present (`data`, `fsdp`)."""
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
  lead = axes if len(axes) > 1 else (axes[0] if axes else None)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
