"""Supervised fine-tuning (full or LoRA) with one compiled train step.

    lm, summary = sft.train(config)          # config: configs/sft.py's ConfigDict

The step is `jax.jit(step_fn, donate_argnums=(0, 1))` over (trainable, opt_state): for LoRA the
trainable pytree is the adapter only (the base weights are a non-donated, non-differentiated
argument), for full fine-tuning it is the model state. Weights are float32 masters; `dtype`
picks float32 or bfloat16 compute. Gradient accumulation is a `lax.scan` over micro-batches
inside the step, normalised by the *whole* batch's loss-token count, so accumulating A micro-
batches gives the same update as one batch A times larger.

Sharding: a mesh with `data` and `fsdp` axes. The batch's rows are split over both; the
model weights (and for full FT the optimizer state) follow `emjax.parallel.WEIGHT_AXES`, which
shards them over `fsdp`; XLA inserts the all-gathers / reduce-scatters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from emjax import parallel
from emjax.models import lora as lora_lib
from emjax.models import transformer
from emjax.models.config import resolve_dtype
from emjax.train import batching, checkpoint, hooks as hooks_lib, metrics_log, optim


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the message names the step and the last good checkpoint."""


# ----------------------------------------------------------------------------- loss

def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits [..., T, V] float32, targets [..., T] -> cross-entropy per position [..., T]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def batch_loss_sums(graphdef, state, micro: dict[str, jax.Array], *, lora: dict | None,
                    compute_dtype) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token losses, sum of weights) of one micro-batch [M, T]."""
  out = transformer.forward(graphdef, state, micro["inputs"], micro["attention_mask"],
                            positions=micro["positions"], segment_ids=micro["segment_ids"], lora=lora,
                            compute_dtype=compute_dtype)
  losses = token_losses(out.logits, micro["targets"])                      # [M, T]
  return jnp.sum(losses * micro["weights"]), jnp.sum(micro["weights"])


def model_inputs(mode: str, trainable, frozen, lora_scales, dropout: float, key) -> tuple[Any, dict | None]:
  """(state, lora) the forward needs, from the trainable pytree and the frozen parts."""
  if mode == "lora":
    adapter = lora_lib.apply_dropout(trainable, dropout, key)
    return frozen, lora_lib.forward_lora(adapter, lora_scales)
  return trainable, None


def make_step_fn(graphdef, optimizer: optax.GradientTransformation, *, mode: str, compute_dtype,
                 dropout: float = 0.0) -> Callable:
  """The pure train step: (trainable, opt_state, frozen, lora_scales, batch [A, M, T], key)
  -> (trainable, opt_state, {"loss", "grad_norm", "loss_tokens"})."""

  def step_fn(trainable, opt_state, frozen, lora_scales, batch, key):
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)

    def micro_loss(params, micro, micro_key):
      state, lora = model_inputs(mode, params, frozen, lora_scales, dropout, micro_key)
      loss_sum, _ = batch_loss_sums(graphdef, state, micro, lora=lora, compute_dtype=compute_dtype)
      return loss_sum / total_weight

    grad_fn = jax.value_and_grad(micro_loss)

    def accumulate(carry, xs):
      loss, grads = carry
      micro, index = xs
      micro_loss_value, micro_grads = grad_fn(trainable, micro, jax.random.fold_in(key, index))
      return (loss + micro_loss_value, jax.tree.map(jnp.add, grads, micro_grads)), None

    accum = batch["inputs"].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (batch, jnp.arange(accum)))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": grad_norm, "loss_tokens": jnp.sum(batch["weights"])}

  return step_fn


def compile_step(step_fn: Callable, trainable, opt_state, mesh=None) -> Callable:
  """jit with donated (trainable, opt_state); on a mesh their output shardings equal the inputs'."""
  if mesh is None:
    return jax.jit(step_fn, donate_argnums=(0, 1))
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
  return jax.jit(step_fn, donate_argnums=(0, 1),
                 out_shardings=(shardings(trainable), shardings(opt_state), parallel.replicated(mesh)))


def batch_to_device(batch: batching.Batch, mesh=None) -> dict[str, jax.Array]:
  """Host batch [A, M, T] -> device arrays; rows (M) split over the mesh's data-like axes."""
  arrays = batch.arrays()
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in arrays.items()}
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
  rows = batch.inputs.shape[1]
  n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  if rows % n:
    raise ValueError(f"micro-batch of {rows} rows cannot be split over mesh axes {axes} ({n} devices); "
                     f"make batch_size / grad_accum a multiple of {n}")
  spec = P(None, (axes if len(axes) > 1 else axes[0]) if axes else None, None)
  sharding = NamedSharding(mesh, spec)
  return {k: jax.device_put(v, sharding) for k, v in arrays.items()}


def place_adapter(params: lora_lib.AdapterParams, mesh=None) -> lora_lib.AdapterParams:
  """A [L, In, R] sharded on In over fsdp, B [L, R, Out] on Out (when the axis divides the dim)."""
  if mesh is None:
    return params
  logical = {"a": (None, "fsdp", None), "b": (None, None, "fsdp")}
  return {p: {k: jax.device_put(v, NamedSharding(mesh, parallel.spec_for(mesh, logical[k], v.shape)))
              for k, v in ab.items()} for p, ab in params.items()}


# ----------------------------------------------------------------------------- config helpers

def lora_spec_from_config(cfg) -> lora_lib.LoraSpec:
  c = cfg.lora
  layers = c.get("layers", None)
  return lora_lib.LoraSpec(rank=int(c.rank), alpha=float(c.alpha), rslora=bool(c.rslora), targets=c.targets,
                           layers=None if layers in (None, "", "all") else layers, dropout=float(c.get("dropout", 0.0)))


def build_mesh(cfg):
  shape = dict(cfg.get("mesh", {}) or {})
  shape = {k: int(v) for k, v in shape.items() if int(v) != 1}
  if not shape:  # every axis 1: plain single-device jit, no mesh
    return None
  return parallel.make_mesh(shape)


def load_examples(cfg, tokenizer) -> tuple[list[batching.Example], batching.TokenizeReport]:
  data = cfg.data
  records = batching.load_records(data.train, seed=cfg.seed, n=data.get("n", None))
  mixture = data.get("mixture", None)
  if mixture is not None and mixture.get("other"):
    total = int(mixture.get("total") or len(records))
    records = batching.load_mixture(data.train, mixture.other, float(mixture.fraction), total, seed=cfg.seed)
  name = data.train if isinstance(data.train, str) else "dataset"
  return batching.tokenize_records(tokenizer, records, max_len=int(data.max_len), loss_on=data.loss_on,
                                   system_prompt=data.get("system_prompt", None), name=name)


def batch_kwargs(cfg, pad_id: int) -> dict[str, Any]:
  return dict(batch_size=int(cfg.batch_size), accum=int(cfg.grad_accum), max_len=int(cfg.data.max_len),
              layout=cfg.data.layout, pad_multiple=int(cfg.data.get("pad_multiple", 32)), pad_id=pad_id,
              seed=int(cfg.seed))


def write_json(path: str, value: Any) -> None:
  """Atomic JSON write (a crash never leaves half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, default=str)
  os.replace(tmp, path)


def model_at(lm, mode: str, trainable, lora_scales):
  """A LanguageModel reflecting the trainable pytree (adapter attached, or the tuned state)."""
  if mode == "lora":
    return dataclasses.replace(lm, lora=lora_lib.forward_lora(trainable, lora_scales))
  return lm.with_state(trainable)


# ----------------------------------------------------------------------------- the loop

def close_run(mngr, log, bar) -> None:
  """Flush checkpoints and logs of a training loop (also after an error)."""
  mngr.wait_until_finished()
  mngr.close()
  log.close()
  if bar is not None:
    bar.close()


def finished_model(lm, mode: str, trainable, lora_scales, spec, workdir: str):
  """The trained model (adapter attached unmerged for LoRA) and the files written for it."""
  tuned = model_at(lm, mode, trainable, lora_scales)
  outputs = {}
  if mode == "lora":
    outputs["adapter"] = lora_lib.save_adapter(os.path.join(workdir, "adapter"), trainable, spec, lm.config,
                                               base_model=lm.source)
    tuned = dataclasses.replace(tuned, adapter_path=outputs["adapter"])
  return tuned, outputs


def train(cfg, *, lm=None, hooks: Sequence[hooks_lib.Hook] = (), progress: bool = True):
  """Runs (or resumes) a fine-tuning run described by `cfg` in `cfg.workdir`.

  Returns (the fine-tuned LanguageModel, summary dict). Raises `NonFiniteLossError` when the loss
  becomes NaN/inf; checkpoints on disk stay those of the last good step.
  """
  from emjax.models import lm as lm_lib
  workdir = os.path.abspath(cfg.workdir)
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, "config.json"), json.loads(cfg.to_json_best_effort()))
  mode = cfg.mode
  if mode not in ("lora", "full"):
    raise ValueError(f"config.mode={mode!r}; expected 'lora' or 'full'")
  compute_dtype = resolve_dtype(cfg.dtype)
  mesh = build_mesh(cfg)
  if lm is None:
    # Full FT keeps float32 master weights; LoRA may store the frozen base in bfloat16 (7B on one GPU).
    param_dtype = "float32" if mode == "full" else cfg.get("base_param_dtype", "float32")
    lm = lm_lib.load_model(cfg.model, dtype=cfg.dtype, param_dtype=param_dtype, mesh=mesh)
  elif mesh is not None and lm.mesh is None:  # a model built in memory: place it on the run's mesh
    lm = lm_lib.from_weights(lm.config, lm.weights(), lm.tokenizer, dtype=cfg.dtype, param_dtype="float32",
                             mesh=mesh, source=lm.source)
  if lm.tokenizer is None:
    raise ValueError(f"model {lm.source!r} has no tokenizer; SFT renders chats with the model's chat template")

  examples, report = load_examples(cfg, lm.tokenizer)
  kwargs = batch_kwargs(cfg, lm.tokenizer.pad_id)
  per_epoch = batching.steps_per_epoch(examples, epochs=int(cfg.epochs), **kwargs)
  total_steps = sum(per_epoch)
  if cfg.get("max_steps", None):
    total_steps = min(total_steps, int(cfg.max_steps))
  schedule = optim.lr_schedule(float(cfg.optim.lr), total_steps, warmup_steps=int(cfg.optim.warmup_steps),
                               decay=cfg.optim.decay, end_lr_fraction=float(cfg.optim.get("end_lr_fraction", 0.0)))
  optimizer = optim.adamw(schedule, weight_decay=float(cfg.optim.weight_decay), b1=float(cfg.optim.b1),
                          b2=float(cfg.optim.b2), eps=float(cfg.optim.eps),
                          clip_norm=float(cfg.optim.clip_norm) if cfg.optim.clip_norm else None)

  key = jax.random.PRNGKey(int(cfg.seed))
  lora_scales = None
  spec = None
  if mode == "lora":
    spec = lora_spec_from_config(cfg)
    lora_scales = lora_lib.layer_scales(spec, lm.config)
    if mesh is not None:
      lora_scales = jax.device_put(lora_scales, parallel.replicated(mesh))
    trainable = place_adapter(lora_lib.init_adapter(spec, lm.config, jax.random.fold_in(key, 1)), mesh)
    frozen = lm.state
  else:
    # A fresh float32 copy: the step donates it, and the caller's `lm` must stay usable.
    trainable = jax.jit(lambda state: jax.tree.map(lambda x: x.astype(jnp.float32) + 0, state))(lm.state)
    frozen = None
  opt_state = jax.jit(optimizer.init)(trainable)
  if mesh is not None:  # scalars (Adam's step count) come back on one device: replicate them on the mesh
    opt_state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                             else jax.device_put(x, parallel.replicated(mesh)), opt_state)

  mngr = checkpoint.manager(workdir, keep=int(cfg.checkpoint.keep), async_save=bool(cfg.checkpoint.get("async_save", False)))
  start_step = 0
  restored = checkpoint.restore_latest(mngr, {"params": trainable, "opt_state": opt_state})
  if restored is not None:
    start_step, state, meta = restored
    trainable, opt_state = state["params"], state["opt_state"]
    if meta.get("num_examples") != len(examples):
      raise ValueError(f"{workdir}: checkpoint was made with {meta.get('num_examples')} training examples, the "
                       f"data now gives {len(examples)}; resume with the same data or use a fresh workdir")
  log = metrics_log.MetricsLog(workdir, resume_from_step=start_step if restored is not None else 0,
                               tensorboard=bool(cfg.get("tensorboard", True)))

  step_fn = compile_step(make_step_fn(lm.graphdef, optimizer, mode=mode, compute_dtype=compute_dtype,
                                      dropout=float(spec.dropout) if spec else 0.0), trainable, opt_state, mesh)
  save_every = int(cfg.checkpoint.every)
  eval_every = int(cfg.get("eval_every", 0) or 0)
  meta_base = {"num_examples": len(examples), "total_steps": total_steps, "mode": mode}
  losses: list[float] = []
  last_saved = start_step if restored is not None else None
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=start_step, desc=f"sft[{mode}]", unit="step", dynamic_ncols=True)
  started = time.perf_counter()
  try:
    for step0, epoch, host_batch in batching.iter_batches(examples, per_epoch, start_step, **kwargs):
      if step0 >= total_steps:
        break
      step = step0 + 1                         # optimizer updates done after this one
      t0 = time.perf_counter()
      device_batch = batch_to_device(host_batch, mesh)
      trainable, opt_state, out = step_fn(trainable, opt_state, frozen, lora_scales, device_batch,
                                          jax.random.fold_in(key, step))
      loss = float(out["loss"])
      dt = time.perf_counter() - t0
      if not math.isfinite(loss):
        where = f"step {last_saved} in {os.path.join(workdir, 'checkpoints')}" if last_saved else "none saved yet"
        log.write(step, {"loss": loss, "epoch": epoch})
        raise NonFiniteLossError(f"loss is {loss} at step {step} (epoch {epoch}); training stopped. Last good "
                                 f"checkpoint: {where}. Lower the learning rate or check the data")
      tokens = int(host_batch.attention_mask.sum())
      metrics = {"loss": loss, "lr": float(schedule(step - 1)), "grad_norm": float(out["grad_norm"]),
                 "loss_tokens": int(out["loss_tokens"]), "tokens": tokens, "tokens_per_s": tokens / dt,
                 "step_time_s": dt, "epoch": epoch}
      losses.append(loss)
      if step % save_every == 0 or step == total_steps:
        checkpoint.save(mngr, step, {"params": trainable, "opt_state": opt_state}, {**meta_base, "step": step,
                                                                                   "epoch": epoch})
        last_saved = step
      if hooks and eval_every and step % eval_every == 0:
        metrics.update(hooks_lib.run_hooks(hooks, step, model_at(lm, mode, trainable, lora_scales)))
      log.write(step, metrics)
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:.0f}")
  finally:
    close_run(mngr, log, bar)

  tuned, outputs = finished_model(lm, mode, trainable, lora_scales, spec, workdir)
  if cfg.get("export_hf", False) or mode == "full":
    outputs["hf"] = lm_lib.save_hf(tuned, os.path.join(workdir, "merged_hf" if mode == "lora" else "model_hf"))
  summary = {"mode": mode, "model": lm.source, "steps": total_steps, "resumed_from": start_step if restored else None,
             "final_loss": losses[-1] if losses else None, "data": report.to_json(),
             "wall_s": time.perf_counter() - started, "outputs": outputs,
             "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainable)))}
  write_json(os.path.join(workdir, "summary.json"), summary)
  return tuned, summary
