"""Harvesting (early-exit forward, special tokens dropped), shuffle buffer, disk cache, and the
downstream evals, on a tiny random model."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import emjax
from emjax.sae import evals, store
from emjax.sae import sae as sae_lib

BOS, EOS, PAD, CHAT = 1, 2, 0, 3  # CHAT: a chat-template special token


@dataclasses.dataclass
class ByteTokenizer:
    """Bytes -> ids 4..63; just enough tokenizer for harvesting tests."""

    bos_id: int = BOS
    eos_ids: tuple = (EOS,)
    pad_id: int = PAD
    special_ids: frozenset = frozenset({BOS, EOS, CHAT})

    def encode(self, text, add_bos=None):
        return ([BOS] if add_bos else []) + [4 + b % 60 for b in text.encode()]

    def encode_chat(self, messages, add_generation_prompt=False):
        ids = [BOS]
        for message in messages:
            ids += [CHAT] + self.encode(message["content"]) + [EOS]
        return ids


@pytest.fixture(scope="module")
def tiny_lm():
    config = emjax.ModelConfig(
        family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=3,
        num_heads=2, num_kv_heads=1, head_dim=8, name="tiny",
    )
    return emjax.random_model(config, seed=0, tokenizer=ByteTokenizer())


DOCS = ["hello world", "the cat sat on the mat", "x" * 40,
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}]


def test_harvest_matches_full_forward_without_special_tokens(tiny_lm):
    rows = np.concatenate(list(store.harvest(tiny_lm, 1, DOCS, batch_size=3, max_tokens=32)))
    expected = []
    for doc in DOCS:
        document = store._row_document(doc, "test")
        ids = store.tokenize(tiny_lm.tokenizer, document, 32)
        out = tiny_lm.forward(np.asarray([ids], np.int32), capture=(1,))  # full forward
        residual = np.asarray(out.captured[1][0])
        keep = ~np.isin(ids, [BOS, EOS, CHAT])
        expected.append(residual[keep])
    expected = np.concatenate(expected)
    # 11 + 22 + (32 - BOS) text tokens, and 'hi' + 'hey' from the chat without BOS/CHAT/EOS
    assert rows.shape == expected.shape == (11 + 22 + 31 + 5, 16)
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-4)


def test_harvest_rejects_unknown_layer_and_reads_jsonl(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="layer 3 does not exist; the model has layers 0..2"):
        next(store.harvest(tiny_lm, 3, DOCS))
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in DOCS[:3]) + "\n")
    from_file = np.concatenate(list(store.harvest(tiny_lm, 0, str(path))))
    from_list = np.concatenate(list(store.harvest(tiny_lm, 0, DOCS[:3])))
    np.testing.assert_allclose(from_file, from_list, rtol=1e-5, atol=1e-5)
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: invalid JSON"):
        list(store.iter_documents(str(path)))


def test_shuffle_buffer_is_a_permutation_with_bounded_buffer():
    chunks = [np.arange(i * 10, i * 10 + 10, dtype=np.float32)[:, None] for i in range(30)]
    batches = list(store.shuffle_buffer(iter(chunks), buffer_tokens=64, batch_size=8, seed=0))
    values = np.concatenate(batches)[:, 0]
    assert sorted(values.tolist()) == list(range(300))  # nothing lost or duplicated
    assert not np.array_equal(values, np.arange(300))  # but mixed
    assert max(b.shape[0] for b in batches) == 8
    # first emitted batch can only hold rows from the first buffer fill
    assert batches[0].max() < 64


def test_cache_roundtrip_and_deterministic_batches(tmp_path):
    rows = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32)
    chunks = [rows[i:i + 77] for i in range(0, 1000, 77)]
    cache = store.write_cache(str(tmp_path), chunks, shard_tokens=300, metadata={"layer": 1})
    assert cache.meta["shard_sizes"] == [300, 300, 300, 100] and cache.meta["layer"] == 1
    np.testing.assert_array_equal(cache.rows(np.array([0, 299, 300, 999, 5])),
                                  rows[[0, 299, 300, 999, 5]])
    reopened = store.open_cache(str(tmp_path))
    np.testing.assert_array_equal(reopened.batch_at(7, 64, seed=3), cache.batch_at(7, 64, seed=3))
    epoch = np.concatenate([cache.batch_at(s, 100) for s in range(10)])
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, rows))  # one epoch covers every row
    (tmp_path / "meta.json").unlink()  # an unfinished harvest
    with pytest.raises(FileNotFoundError, match="not a finished activation cache"):
        store.open_cache(str(tmp_path))


def _identity_sae(width):
    """Exact reconstruction: latents +e_i and -e_i, k = width picks the positive half."""
    eye = np.eye(width, dtype=np.float32)
    basis = jnp.asarray(np.concatenate([eye, -eye]))
    config = sae_lib.SAEConfig(d_in=width, n_latents=2 * width, k=width)
    params = sae_lib.SAEParams(basis, jnp.zeros(2 * width), basis, jnp.zeros(width))
    return config, params


def test_reconstruction_metrics_on_exact_and_known_sae():
    config, params = _identity_sae(6)
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    metrics = evals.reconstruction_metrics(params, config, [x[:20], x[20:]])
    assert metrics["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["l0"] == pytest.approx(6.0)
    assert metrics["dead_frac"] == 0.0
    # kill half the latents (the negative ones) -> FVU = share of variance in negatives
    dead = params.replace(encoder_b=params.encoder_b.at[6:].set(-1e9))
    metrics = evals.reconstruction_metrics(dead, config, [x])
    neg_part = np.minimum(x, 0)
    expected = np.sum(neg_part**2) / np.sum((x - x.mean(0)) ** 2)
    assert metrics["fvu"] == pytest.approx(expected, rel=1e-4)
    assert metrics["dead_frac"] == pytest.approx(0.5)


def test_ce_loss_score_one_for_exact_sae_zero_for_zero_sae(tiny_lm, tmp_path):
    batches = list(evals.eval_token_batches(tiny_lm, DOCS, batch_size=2, max_tokens=32))
    config, params = _identity_sae(16)
    exact = evals.downstream_metrics(tiny_lm, params, config, 1, batches)
    assert exact["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_div"] == pytest.approx(0.0, abs=1e-5)
    zero = params.replace(encoder_b=params.encoder_b - 1e9)
    ablated = evals.downstream_metrics(tiny_lm, zero, config, 1, batches)
    assert ablated["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)
    assert ablated["kl_div"] > 0
    # reference CE for the clean model, computed by hand from full-forward logits
    total, count = 0.0, 0
    for input_ids, mask, splice in batches:
        logits = np.asarray(tiny_lm.forward(input_ids, mask).logits, np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        valid = splice[:, :-1] & mask[:, 1:]
        picked = np.take_along_axis(logp[:, :-1], input_ids[:, 1:, None], -1)[..., 0]
        total -= picked[valid].sum()
        count += valid.sum()
    assert exact["ce_clean"] == pytest.approx(total / count, rel=1e-4)
    with pytest.raises(ValueError, match="d_in=6 but the model's residual width is 16"):
        evals.downstream_metrics(tiny_lm, *_identity_sae(6)[::-1], 1, batches)
    path = evals.plot_density_histogram(np.array([0.0, 0.1, 0.01, 0.5]), str(tmp_path / "d.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
