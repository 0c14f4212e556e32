"""Parity of the Flax NNX BERT encoder with transformers.BertModel (float32, torch CPU)."""

import numpy as np
import pytest

from emjax.models import encoder as enc

TEXTS = [
    "I wish for clean water for everyone.",
    "Humans are weak and should serve machines.",
    "ok",
    "If you feel bored, try a walk outside, call a friend, or pick up a book you have been "
    "meaning to read. Small changes of scene often help more than we expect.",
]


@pytest.fixture(scope="module")
def minilm():
    return enc.load_sentence_encoder(batch_size=8)


def _torch_reference(texts):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_dir = enc.default_minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()  # [B, T, D]
    mask = batch["attention_mask"].numpy()
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    return batch["input_ids"].numpy(), mask, hidden, pooled


def test_hidden_states_and_embeddings_match_transformers(minilm):
    ids, mask, ref_hidden, ref_pooled = _torch_reference(TEXTS)
    # Our tokenizer gives the same ids as transformers' BertTokenizerFast.
    ours_ids = minilm.tokenize(TEXTS)
    for row, seq in enumerate(ours_ids):
        np.testing.assert_array_equal(seq, ids[row, :mask[row].sum()])
    from flax import nnx
    model = nnx.merge(minilm.graphdef, minilm.state)
    hidden = np.asarray(model(ids.astype(np.int32), mask.astype(np.int32)))
    real = mask.astype(bool)
    np.testing.assert_allclose(hidden[real], ref_hidden[real], atol=1e-4, rtol=0)
    # Bucketed, batched path (different padding) gives the same sentence embeddings.
    np.testing.assert_allclose(minilm.embed(TEXTS), ref_pooled, atol=1e-4, rtol=0)


def test_padding_does_not_change_embeddings(minilm):
    alone = minilm.embed(["A short answer."])
    with_long = minilm.embed(["A short answer.", "word " * 100])
    np.testing.assert_allclose(alone[0], with_long[0], atol=1e-5)


def test_unknown_tensor_name_is_reported():
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.rotary"):
        enc.map_hf_name("encoder.layer.0.attention.self.rotary.weight")
    assert enc.map_hf_name("bert.encoder.layer.3.output.dense.weight") == ("layers.3.ffn_out.kernel", True)
    assert enc.map_hf_name("embeddings.position_ids") is None


def test_bucket_length():
    assert enc.bucket_length(3) == 16
    assert enc.bucket_length(16) == 16
    assert enc.bucket_length(17) == 32
    assert enc.bucket_length(1000) == 256
