"""Optimizer and learning-rate schedule shared by SFT and RL: AdamW + warmup + decay + clipping."""

from __future__ import annotations

import jax
import optax


def lr_schedule(peak_lr: float, total_steps: int, *, warmup_steps: int = 0, decay: str = "linear",
                end_lr_fraction: float = 0.0) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup_steps`, then `decay` ("linear" | "cosine" | "constant") to
  `end_lr_fraction * peak` at `total_steps`."""
  warmup_steps = max(0, min(warmup_steps, total_steps))
  decay_steps = max(1, total_steps - warmup_steps)
  end = peak_lr * end_lr_fraction
  if decay == "linear":
    after = optax.linear_schedule(peak_lr, end, decay_steps)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=end_lr_fraction)
  elif decay == "constant":
    after = optax.constant_schedule(peak_lr)
  else:
    raise ValueError(f"lr decay {decay!r}; expected 'linear', 'cosine' or 'constant'")
  if warmup_steps == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps), after], [warmup_steps])


def decay_mask(params) -> object:
  """Weight decay on matrices only (ndim >= 2): norms and biases are not decayed, as usual."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def adamw(schedule: optax.Schedule, *, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW. Gradient accumulation happens in the train step (a scan
  over micro-batches), so one call of this transform is one optimizer step."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)
