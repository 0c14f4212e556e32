"""SAE benchmark suite: training tokens/s of emjax vs SAELens vs EleutherAI sparsify on the same
cached activations, and harvesting tokens/s vs a transformers forward with an output hook.

    python -m experiments.bench_sae --out=runs/bench_sae.json          # standalone
    experiments/benchmark.py --suite=sae  calls run_sae_suite(args)     # from the lead's runner

SAELens and sparsify are torch libraries; they live in a separate interpreter (default
/tmp/benchvenv/bin/python, or $EMJAX_BENCH_PYTHON, or args.bench_python) so emjax's own env
stays torch-free at run time. Each is timed in a subprocess on the same .npy activations;
a library that is not importable there is skipped with a note. One run, one machine: compare
ratios, not absolute numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import numpy as np

from experiments.bench_common import suite_arg as _arg

_TORCH_TRAINER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np, torch
    lib, path, n_latents, k, batch, steps, warmup = sys.argv[1:8]
    n_latents, k, batch, steps, warmup = map(int, (n_latents, k, batch, steps, warmup))
    data = torch.from_numpy(np.load(path))
    d_in = data.shape[1]
    torch.manual_seed(0)
    if lib == "sparsify":
        from sparsify import SparseCoder, SparseCoderConfig
        sae = SparseCoder(d_in, SparseCoderConfig(num_latents=n_latents, k=k))
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
        since_fired = torch.zeros(n_latents, dtype=torch.long)
        def step(x):
            # sparsify's Trainer.fit: unit-norm decoder, FVU + AuxK, parallel-grad removal
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x, dead_mask=since_fired > 10_000_000)
            (out.fvu + out.auxk_loss / 32).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step(); opt.zero_grad()
            since_fired.add_(x.shape[0]); since_fired[out.latent_indices.flatten()] = 0
    else:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n_latents, k=k,
                                                    aux_loss_coefficient=1 / 32))
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4)
        dead = torch.zeros(n_latents, dtype=torch.bool)
        def step(x):
            # SAELens' SAETrainer: training_forward_pass, grad clipping at 1.0, Adam
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0,
                is_logging_step=False))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step(); opt.zero_grad()
    n = data.shape[0] // batch
    for i in range(warmup):
        step(data[(i % n) * batch:(i % n + 1) * batch])
    start = time.perf_counter()
    for i in range(steps):
        step(data[(i % n) * batch:(i % n + 1) * batch])
    seconds = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": steps * batch / seconds, "seconds": seconds,
                      "threads": torch.get_num_threads(), "version": __import__(
                          "importlib.metadata").metadata.version(
                          "eai-sparsify" if lib == "sparsify" else "sae-lens")}))
    """
)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matmul ceiling as JAX sees it (GFLOP/s)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        mm(a).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def activation_file(path: str, num_tokens: int, d_in: int, seed: int = 0) -> str:
    """Activations for the throughput test: the embedded model's cache if given, else
    heavy-tailed random rows (speed does not depend on content at fixed k)."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_t(df=4, size=(num_tokens, d_in)).astype(np.float32)
    rows += rng.normal(size=(1, d_in)).astype(np.float32) * 3  # a shared offset, like a residual
    np.save(path, rows)
    return path


def bench_emjax_training(path: str, n_latents: int, k: int, batch: int, steps: int,
                         warmup: int) -> dict:
    import jax

    from emjax.sae import sae as sae_lib
    from emjax.sae import train

    data = np.load(path)
    config = sae_lib.SAEConfig(d_in=data.shape[1], n_latents=n_latents, k=k)
    optimizer = train.make_optimizer(sae_lib.default_learning_rate(n_latents), 10)
    state = train.init_state(config, optimizer, data[:8192])
    step_fn, state, batch_sharding = train.compile_train_step(
        config, optimizer, train.make_mesh(), state
    )
    batches = data.shape[0] // batch
    device_batches = [jax.device_put(data[i * batch:(i + 1) * batch], batch_sharding)
                      for i in range(batches)]
    for i in range(warmup):
        state, metrics = step_fn(state, device_batches[i % batches])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step_fn(state, device_batches[i % batches])
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps * batch / seconds, "seconds": seconds,
            "final_fvu": float(metrics["fvu"])}


def bench_torch_library(lib: str, python: str, path: str, n_latents: int, k: int, batch: int,
                        steps: int, warmup: int) -> dict:
    if not os.path.exists(python):
        return {"skipped": f"no interpreter at {python} (make a venv with sae-lens, eai-sparsify)"}
    module = "sparsify" if lib == "sparsify" else "sae_lens"
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode:
        return {"skipped": f"{module} not importable in {python}: {probe.stderr.strip()[-300:]}"}
    done = subprocess.run(
        [python, "-c", _TORCH_TRAINER, lib, path, str(n_latents), str(k), str(batch), str(steps),
         str(warmup)], capture_output=True, text=True,
    )
    if done.returncode:
        return {"skipped": f"{lib} failed: {done.stderr.strip()[-600:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_harvest(layer: int, batch: int, seq_len: int, repeats: int) -> dict:
    """emjax early-exit forward vs transformers full forward with a hook on the same layer."""
    import jax
    import torch
    import transformers

    import emjax

    lm = emjax.load_model("smollm2-135m-instruct")
    ids = np.random.default_rng(0).integers(10, lm.config.vocab_size, (batch, seq_len), np.int32)
    mask = np.ones_like(ids, bool)
    lm.residuals(ids, mask, layers=(layer,))[layer].block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        captured = lm.residuals(ids, mask, layers=(layer,))[layer]
        np.asarray(captured)  # to host, as harvesting does
    emjax_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as directory:
        emjax.save_hf(lm, directory)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    grabbed = {}
    hook = model.model.layers[layer].register_forward_hook(
        lambda module, inputs, output: grabbed.__setitem__(
            "h", (output[0] if isinstance(output, tuple) else output).detach().numpy()))
    torch_ids = torch.from_numpy(ids.astype(np.int64))
    with torch.inference_mode():
        model(torch_ids)
        start = time.perf_counter()
        for _ in range(repeats):
            model(torch_ids)
        torch_seconds = time.perf_counter() - start
    hook.remove()
    max_diff = float(np.abs(grabbed["h"] - np.asarray(captured)).max())
    tokens = repeats * batch * seq_len
    return {
        "emjax_tokens_per_s": tokens / emjax_seconds,
        "transformers_hook_tokens_per_s": tokens / torch_seconds,
        "speedup": torch_seconds / emjax_seconds,
        "max_abs_diff_residual": max_diff,
        "shape": [batch, seq_len], "layer": layer, "jax_devices": len(jax.devices()),
    }


def run_sae_suite(args: Any) -> dict:
    """Run the SAE benchmarks; ``args`` is a namespace or dict with optional fields
    sae_d_in (576), sae_latents (9216), sae_k (32), sae_batch (4096), sae_steps (8),
    sae_warmup (2), bench_python, sae_harvest (True), sae_activations (.npy path)."""
    d_in = int(_arg(args, "sae_d_in", 576))
    n_latents = int(_arg(args, "sae_latents", 9216))
    k = int(_arg(args, "sae_k", 32))
    batch = int(_arg(args, "sae_batch", 4096))
    steps = int(_arg(args, "sae_steps", 8))
    warmup = int(_arg(args, "sae_warmup", 2))
    python = _arg(args, "bench_python", os.environ.get("EMJAX_BENCH_PYTHON",
                                                       "/tmp/benchvenv/bin/python"))
    result: dict[str, Any] = {
        "shape": {"d_in": d_in, "n_latents": n_latents, "k": k, "batch": batch, "steps": steps},
        "matmul_gflops": matmul_gflops(),
    }
    with tempfile.TemporaryDirectory() as directory:
        path = _arg(args, "sae_activations", None) or activation_file(
            os.path.join(directory, "acts.npy"), batch * 4, d_in)
        result["emjax"] = bench_emjax_training(path, n_latents, k, batch, steps, warmup)
        for lib in ("sparsify", "saelens"):
            result[lib] = bench_torch_library(lib, python, path, n_latents, k, batch, steps, warmup)
    ours = result["emjax"]["tokens_per_s"]
    # encoder matmul forward = 2*B*D*N FLOPs per step: the unavoidable part
    result["emjax"]["encoder_fwd_fraction_of_ceiling"] = (
        2 * d_in * n_latents * ours / 1e9 / result["matmul_gflops"])
    baselines = {lib: result[lib]["tokens_per_s"] for lib in ("sparsify", "saelens")
                 if "tokens_per_s" in result[lib]}
    for lib, rate in baselines.items():
        result[f"speedup_vs_{lib}"] = ours / rate
    if baselines:
        result["speedup_vs_fastest"] = ours / max(baselines.values())
        result["target_met"] = result["speedup_vs_fastest"] >= 1.5
    if _arg(args, "sae_harvest", True):
        result["harvest"] = bench_harvest(layer=15, batch=8, seq_len=128, repeats=3)
    return result


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_sae.json", help="where to write the JSON")
    parser.add_argument("--sae_steps", type=int, default=8, help="timed steps per library")
    parser.add_argument("--sae_harvest", type=int, default=1, help="1: also time harvesting")
    parser.add_argument("--bench_python", default=None, help="interpreter with sae-lens/sparsify")
    args = parser.parse_args(argv)
    result = run_sae_suite(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
