"""SAE training loop: 8 fake devices == 1 device, kill-and-resume equality, logs written."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from emjax.sae import sae as sae_lib
from emjax.sae import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch_at(step, batch=256, d=16):
    return np.random.default_rng(step).normal(size=(batch, d)).astype(np.float32) * 2.0 + 1.0


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    config = sae_lib.SAEConfig(d_in=16, n_latents=64, k=4, dead_tokens=512)
    kwargs = dict(learning_rate=1e-3, warmup_steps=3, progress=False, checkpoint_every=4,
                  log_every=2)
    sample = _batch_at(999)
    straight = train_lib.fit(config, _batch_at, 10, sample, **kwargs)
    workdir = str(tmp_path / "run")
    train_lib.fit(config, _batch_at, 10, sample, workdir=workdir, stop_after=6, **kwargs)  # "killed"
    resumed = train_lib.fit(config, _batch_at, 10, sample, workdir=workdir, **kwargs)
    assert int(resumed.step) == 10
    for name in ("encoder_w", "encoder_b", "decoder_w", "decoder_b"):
        np.testing.assert_array_equal(
            np.asarray(getattr(resumed.params, name)), np.asarray(getattr(straight.params, name)),
            err_msg=name,
        )
    np.testing.assert_array_equal(resumed.tokens_since_fired, straight.tokens_since_fired)
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    assert {"loss", "fvu", "l0", "dead_frac", "aux_loss", "tokens_per_s"} <= set(records[0])
    assert os.listdir(os.path.join(workdir, "tensorboard"))


_MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from emjax.sae import sae as sae_lib, train as train_lib
    assert jax.device_count() == 8, jax.devices()
    config = sae_lib.SAEConfig(d_in=16, n_latents=64, k=4, k_aux=4, dead_tokens=256)
    def batch_at(step):
        return np.random.default_rng(step).normal(size=(128, 16)).astype(np.float32) + 0.5
    results = {}
    for name, (devices, model_parallel) in {
        "one": (1, 1), "data8": (8, 1), "data4_model2": (8, 2)
    }.items():
        mesh = train_lib.make_mesh(devices, model_parallel)
        state = train_lib.fit(config, batch_at, 8, batch_at(99), learning_rate=3e-3,
                              warmup_steps=2, mesh=mesh, progress=False)
        results[name] = {
            "decoder_w": np.asarray(state.params.decoder_w).tolist(),
            "encoder_w": np.asarray(state.params.encoder_w).tolist(),
            "decoder_b": np.asarray(state.params.decoder_b).tolist(),
            "dead": np.asarray(state.tokens_since_fired).tolist(),
            "shards": len(state.params.encoder_w.sharding.device_set),
        }
    json.dump(results, sys.stdout)
    """
)


@pytest.mark.slow
def test_eight_fake_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    one = results["one"]
    for name in ("data8", "data4_model2"):
        for field in ("decoder_w", "encoder_w", "decoder_b"):
            np.testing.assert_allclose(
                results[name][field], one[field], rtol=1e-4, atol=1e-5, err_msg=f"{name}.{field}"
            )
        np.testing.assert_array_equal(results[name]["dead"], one["dead"])
    assert results["data8"]["shards"] == 8  # replicated over all 8 devices
