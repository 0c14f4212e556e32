"""HF safetensors -> emjax -> HF round trips on tiny random models, both families."""

import numpy as np
import pytest

import emjax
from tests.hf_tiny import TINY_VARIANTS, tiny_hf_model, torch_logits


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_roundtrip_logits_match_transformers(variant, tmp_path):
  import transformers
  ref = tiny_hf_model(variant)
  src = tmp_path / "src"
  ref.save_pretrained(src, safe_serialization=True)
  lm = emjax.load_model(str(src))
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 256, size=(2, 11)).astype(np.int32)
  want = torch_logits(ref, ids)
  got = np.asarray(lm.logits(ids))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

  out = tmp_path / "exported"
  emjax.save_hf(lm, str(out))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval().float()
  np.testing.assert_allclose(torch_logits(reloaded, ids), want, atol=1e-4, rtol=1e-4)
  again = emjax.load_model(str(out))
  np.testing.assert_array_equal(np.asarray(again.logits(ids)), got)


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_bias_gqa"])
def test_left_and_right_padding_match_transformers(variant, tmp_path):
  ref = tiny_hf_model(variant)
  ref.save_pretrained(tmp_path, safe_serialization=True)
  lm = emjax.load_model(str(tmp_path))
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 256, size=(3, 9)).astype(np.int32)
  lengths = [9, 6, 3]
  left = np.zeros_like(ids)
  right = np.zeros_like(ids)
  left_mask = np.zeros_like(ids)
  right_mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    left[row, 9 - n:] = ids[row, :n]
    left_mask[row, 9 - n:] = 1
    right[row, :n] = ids[row, :n]
    right_mask[row, :n] = 1
  got_left = np.asarray(lm.logits(left, left_mask))
  got_right = np.asarray(lm.logits(right, right_mask))
  for row, n in enumerate(lengths):
    alone = torch_logits(ref, ids[row:row + 1, :n])[0]
    np.testing.assert_allclose(got_left[row, 9 - n:], alone, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_right[row, :n], alone, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got_left, torch_logits(ref, left, left_mask) * left_mask[..., None]
                             + got_left * (1 - left_mask[..., None]), atol=1e-4, rtol=1e-4)


def test_bfloat16_compute_is_close_to_float32(tmp_path):
  ref = tiny_hf_model("llama_gqa_tied")
  ref.save_pretrained(tmp_path, safe_serialization=True)
  ids = np.arange(3, 19, dtype=np.int32)[None]
  f32 = np.asarray(emjax.load_model(str(tmp_path)).logits(ids))
  bf16 = np.asarray(emjax.load_model(str(tmp_path), dtype="bfloat16").logits(ids))
  assert bf16.dtype == np.float32
  assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()
  assert not np.array_equal(bf16, f32)


def test_sharded_checkpoint_index(tmp_path):
  ref = tiny_hf_model("qwen2_bias_gqa")
  ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  lm = emjax.load_model(str(tmp_path))
  ids = np.arange(5, 20, dtype=np.int32)[None]
  np.testing.assert_allclose(np.asarray(lm.logits(ids)), torch_logits(ref, ids), atol=1e-4, rtol=1e-4)
