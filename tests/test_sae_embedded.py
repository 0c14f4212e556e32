"""End to end on the embedded SmolLM2-135M-Instruct: harvest its middle layer, train a small
TopK SAE, check held-out FVU < 0.3 with L0 ~ k, and the SAELens file round trip."""

import random

import numpy as np
import pytest

import emjax
from emjax.sae import evals, files, store, train
from emjax.sae import sae as sae_lib


@pytest.mark.slow
def test_embedded_model_sae_reaches_fvu_below_0_3(tmp_path):
    lm = emjax.load_model("smollm2-135m-instruct")
    layer = lm.config.num_layers // 2
    documents = list(store.iter_documents("builtin:all"))
    random.Random(0).shuffle(documents)
    rows = np.concatenate(list(store.harvest(
        lm, layer, documents[:160], batch_size=16, max_tokens=96, max_total_tokens=9000)))
    rng = np.random.default_rng(0)
    rows = rows[rng.permutation(len(rows))]
    train_rows, eval_rows = rows[:-1500], rows[-1500:]
    assert train_rows.shape[1] == 576

    config = sae_lib.SAEConfig(d_in=576, n_latents=8 * 576, k=32, dead_tokens=50_000)
    batch = 512
    per_epoch = len(train_rows) // batch

    def batch_at(step):
        start = (step % per_epoch) * batch
        return train_rows[start:start + batch]

    state = train.fit(config, batch_at, 150, train_rows[:4096], learning_rate=2e-3,
                      warmup_steps=15, progress=False)
    sae_dir = files.save_sae(str(tmp_path / "sae"), config, state.params,
                             input_scale=float(state.input_scale), model_name=lm.name, layer=layer)
    loaded_config, params, meta = files.load_sae(sae_dir)
    assert files.check_matches_model(loaded_config, meta, 576, 30) == layer
    metrics = evals.reconstruction_metrics(params, loaded_config, [eval_rows])
    assert metrics["fvu"] < 0.3, metrics
    assert 28 <= metrics["l0"] <= 32  # k, less the few top-k pre-activations ReLU zeroes
    assert 0.0 <= metrics["dead_frac"] < 0.5
    with pytest.raises(ValueError, match="d_in=576 but the model's residual width is 960"):
        files.check_matches_model(loaded_config, meta, 960, 24)
