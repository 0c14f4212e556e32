"""SAE training: optimizer, one jitted data-parallel step, the loop with checkpoints and logs.

The step is a single ``jax.jit`` of (state, batch) -> (state, metrics). The batch is sharded
over the mesh's ``data`` axis with ``NamedSharding``; parameters are replicated, so XLA
inserts the gradient all-reduce (this is the product card's "pmapped step" without the
legacy ``jax.pmap``). The state is donated so the update happens in place.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from emjax.sae import sae as sae_lib

# tokens_since_fired saturates here so int32 never overflows on long runs.
_SINCE_FIRED_CAP = 2**30


@flax.struct.dataclass
class TrainState:
    params: sae_lib.SAEParams
    opt_state: Any
    step: jax.Array  # [] int32
    tokens_since_fired: jax.Array  # [N] int32, for dead-latent tracking (AuxK, dead_frac)
    input_scale: jax.Array  # [] float32: batch is multiplied by this before the SAE


def make_optimizer(
    learning_rate: float, warmup_steps: int, total_steps: int | None = None,
    decay_fraction: float = 0.0,
) -> optax.GradientTransformation:
    """Adam with linear warmup, then constant (optionally a linear decay over the last part).

    Adam's eps is small because FVU gradients are tiny at N=2^14+ (Gao et al. use 6.25e-10).
    """
    warmup_steps = max(1, int(warmup_steps))
    schedules = [optax.linear_schedule(0.0, learning_rate, warmup_steps)]
    boundaries = [warmup_steps]
    if total_steps and decay_fraction > 0:
        decay_steps = max(1, int(total_steps * decay_fraction))
        constant_steps = max(0, total_steps - warmup_steps - decay_steps)
        schedules += [
            optax.constant_schedule(learning_rate),
            optax.linear_schedule(learning_rate, 0.0, decay_steps),
        ]
        boundaries += [warmup_steps + constant_steps]
    else:
        schedules.append(optax.constant_schedule(learning_rate))
    schedule = optax.join_schedules(schedules, boundaries)
    return optax.adam(schedule, b1=0.9, b2=0.999, eps=6.25e-10)


def input_scale_for(sample: np.ndarray) -> float:
    """Scale s with mean ||s x|| = sqrt(d): one lr works across models and layers."""
    sample = np.asarray(sample, np.float32)
    mean_norm = float(np.linalg.norm(sample, axis=-1).mean())
    if not np.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"activation sample has mean norm {mean_norm}; cannot scale inputs")
    return float(np.sqrt(sample.shape[-1]) / mean_norm)


def init_state(
    config: sae_lib.SAEConfig,
    optimizer: optax.GradientTransformation,
    sample: np.ndarray,
    seed: int = 0,
    b_dec_init: str = "geometric_median",
) -> TrainState:
    """Initial state from a data sample [S, D]: input scale and b_dec from the sample."""
    sample = np.asarray(sample, np.float32)
    if sample.ndim != 2 or sample.shape[1] != config.d_in:
        raise ValueError(
            f"activation sample has shape {sample.shape}, expected [S, d_in={config.d_in}]"
        )
    scale = input_scale_for(sample)
    scaled = jnp.asarray(sample * scale)
    if b_dec_init == "geometric_median":
        decoder_bias = sae_lib.geometric_median(scaled)
    elif b_dec_init == "mean":
        decoder_bias = scaled.mean(0)
    elif b_dec_init == "zeros":
        decoder_bias = None
    else:
        raise ValueError(
            f"b_dec_init={b_dec_init!r}; expected 'geometric_median', 'mean' or 'zeros'"
        )
    params = sae_lib.init_params(config, jax.random.key(seed), decoder_bias)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        tokens_since_fired=jnp.zeros((config.n_latents,), jnp.int32),
        input_scale=jnp.asarray(scale, jnp.float32),
    )


def train_step(
    state: TrainState,
    batch: jax.Array,  # [B, D] raw activations
    *,
    config: sae_lib.SAEConfig,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam step on FVU + AuxK with the unit-norm decoder constraint."""
    x = batch.astype(jnp.float32) * state.input_scale  # [B, D]
    dead_mask = state.tokens_since_fired >= config.dead_tokens  # [N]
    (loss, stats), grads = jax.value_and_grad(sae_lib.loss_fn, has_aux=True)(
        state.params, config, x, dead_mask
    )
    grads = grads.replace(
        decoder_w=sae_lib.remove_parallel_grad(grads.decoder_w, state.params.decoder_w)
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = params.replace(decoder_w=sae_lib.normalize_rows(params.decoder_w))

    fired = (
        jnp.zeros((config.n_latents,), bool)
        .at[stats["ids"].reshape(-1)]
        .max((stats["acts"] > 0).reshape(-1))
    )  # [N]
    since_fired = jnp.minimum(state.tokens_since_fired + x.shape[0], _SINCE_FIRED_CAP)
    tokens_since_fired = jnp.where(fired, 0, since_fired)
    metrics = {
        "loss": loss,
        "fvu": stats["fvu"],
        "aux_loss": stats["aux_loss"],
        "l0": stats["l0"],
        "dead_frac": jnp.mean(dead_mask.astype(jnp.float32)),
        "grad_norm": optax.tree.norm(grads),
    }
    new_state = state.replace(
        params=params,
        opt_state=opt_state,
        step=state.step + 1,
        tokens_since_fired=tokens_since_fired,
    )
    return new_state, metrics


def make_mesh(num_devices: int | None = None, model_parallel: int = 1) -> Mesh:
    """A (data, model) mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    num_devices = num_devices or len(devices)
    if num_devices > len(devices) or num_devices % model_parallel:
        raise ValueError(
            f"asked for {num_devices} devices with model_parallel={model_parallel}; "
            f"{len(devices)} available and the count must divide evenly"
        )
    grid = np.asarray(devices[:num_devices]).reshape(num_devices // model_parallel, model_parallel)
    return Mesh(grid, ("data", "model"))


def state_sharding(state: TrainState, mesh: Mesh) -> Any:
    """Parameters, optimizer moments and counters replicated over the mesh.

    With a ``model`` axis > 1, the latent dimension (rows of encoder_w/decoder_w, encoder_b,
    tokens_since_fired and the matching Adam moments) is split over ``model``; XLA's SPMD
    partitioner then shards the encoder matmul and merges the per-shard top-k.
    """
    model_size = mesh.shape["model"]
    n_latents = state.tokens_since_fired.shape[0]

    def spec(leaf):
        if model_size > 1 and getattr(leaf, "ndim", 0) >= 1 and leaf.shape[0] == n_latents:
            return NamedSharding(mesh, P("model", *([None] * (leaf.ndim - 1))))
        return NamedSharding(mesh, P())

    return jax.tree.map(spec, state)


def compile_train_step(
    config: sae_lib.SAEConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state: TrainState,
) -> tuple[Callable, TrainState, NamedSharding]:
    """jit the step with the batch over ``data`` and the state donated.

    Returns (step_fn, state placed on the mesh, batch sharding).
    """
    state_shardings = state_sharding(state, mesh)
    batch_sharding = NamedSharding(mesh, P("data", None))
    step_fn = jax.jit(
        partial(train_step, config=config, optimizer=optimizer),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
    )
    return step_fn, jax.device_put(state, state_shardings), batch_sharding


# ---------------------------------------------------------------------------------------------
# Checkpoints (orbax)
# ---------------------------------------------------------------------------------------------


def checkpoint_manager(directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )


def save_checkpoint(manager, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    manager.save(int(state.step), args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_checkpoint(manager, abstract_like: TrainState) -> TrainState | None:
    """Latest checkpoint restored onto ``abstract_like``'s shapes/shardings, or None."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding),
        abstract_like,
    )
    return manager.restore(step, args=ocp.args.StandardRestore(target))


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------


def fit(
    config: sae_lib.SAEConfig,
    batch_at: Callable[[int], np.ndarray],
    num_steps: int,
    sample: np.ndarray,
    *,
    learning_rate: float | None = None,
    warmup_steps: int = 100,
    decay_fraction: float = 0.0,
    seed: int = 0,
    b_dec_init: str = "geometric_median",
    mesh: Mesh | None = None,
    workdir: str | None = None,
    checkpoint_every: int = 500,
    log_every: int = 10,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainState:
    """Train for ``num_steps`` steps; ``batch_at(step)`` must be deterministic in ``step``.

    With a workdir: resumes from the latest checkpoint there, appends ``metrics.jsonl`` and
    TensorBoard events. A deterministic ``batch_at`` makes a resumed run bit-identical to an
    uninterrupted one. ``stop_after`` ends early (simulates a kill, for tests).
    """
    mesh = mesh or make_mesh()
    lr = learning_rate if learning_rate is not None else sae_lib.default_learning_rate(
        config.n_latents
    )
    optimizer = make_optimizer(lr, warmup_steps, num_steps, decay_fraction)
    state = init_state(config, optimizer, sample, seed=seed, b_dec_init=b_dec_init)
    step_fn, state, batch_sharding = compile_train_step(config, optimizer, mesh, state)

    manager = None
    metrics_file = None
    writer = None
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        manager = checkpoint_manager(os.path.join(workdir, "checkpoints"))
        restored = restore_checkpoint(manager, state)
        if restored is not None:
            state = restored
        metrics_file = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # TensorBoard is a nicety; metrics.jsonl is the record
            writer = None

    start_step = int(state.step)
    end_step = num_steps if stop_after is None else min(num_steps, stop_after)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=start_step, desc="sae", unit="step")
    last_time = time.perf_counter()
    last_step = start_step
    try:
        for step in range(start_step, end_step):
            batch = jax.device_put(np.asarray(batch_at(step), np.float32), batch_sharding)
            state, metrics = step_fn(state, batch)
            done = step + 1
            if done % log_every == 0 or done == end_step:
                values = {name: float(value) for name, value in metrics.items()}
                now = time.perf_counter()
                values["tokens_per_s"] = (done - last_step) * batch.shape[0] / (now - last_time)
                last_time, last_step = now, done
                record = {"step": done, **values}
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if writer:
                    for name, value in values.items():
                        writer.add_scalar(f"sae/{name}", value, done)
                if bar:
                    bar.set_postfix(fvu=f"{values['fvu']:.3f}", l0=f"{values['l0']:.1f}")
            if bar:
                bar.update(1)
            if manager and (done % checkpoint_every == 0 or done == end_step):
                save_checkpoint(manager, state)
    finally:
        if bar:
            bar.close()
        if metrics_file:
            metrics_file.close()
        if writer:
            writer.close()
    return state
