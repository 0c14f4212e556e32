"""Orbax checkpoints of the training state (trainable params + optimizer state + step).

One `CheckpointManager` per workdir (`workdir/checkpoints/<step>/`), with two items per step:
`train` (the array pytree, restored straight onto its shardings) and `meta` (JSON: step, epoch,
data and config fingerprints). Saves are synchronous by default: the train step donates its
buffers, and a checkpoint must be complete before a run is trusted to be resumable.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def quiet_orbax_logs() -> None:
  """Binaries call this in main: orbax logs every save and restore at INFO through absl, which
  buries progress bars. Kept when the user asks for them with --verbosity."""
  from absl import flags, logging
  if not (flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present):
    logging.set_verbosity(logging.WARNING)


def manager(workdir: str, *, keep: int | None = None, async_save: bool = False) -> ocp.CheckpointManager:
  """keep=None or 0 keeps every checkpoint (EM's phase transition is read off every 5-step save)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, save_interval_steps=1, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                               item_names=("train", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, train_state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(train=ocp.args.StandardSave(train_state), meta=ocp.args.JsonSave(meta)))


def abstract_like(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`, so a restore lands on the same devices."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> tuple[int, Any, dict] | None:
  """(step, train_state, meta) of the newest checkpoint, or None when the workdir has none."""
  step = mngr.latest_step()
  if step is None:
    return None
  restored = mngr.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(abstract_like(like)),
                                                        meta=ocp.args.JsonRestore()))
  return step, restored["train"], dict(restored["meta"])
