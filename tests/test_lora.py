"""LoRA: zero-init is a no-op, merge equals unmerged, layer filters, scaling, files, HF export."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import emjax
from emjax.models import lm as lm_lib
from emjax.models import lora as lora_lib
from tests.hf_tiny import tiny_hf_model, torch_logits
from tests.numerics import assert_same_computation
from tests.test_sft_common import rng_ids, tiny_config


def _random_adapter(spec, cfg, seed=0):
  """An adapter with non-zero B, so the update is visible."""
  params = lora_lib.init_adapter(spec, cfg, jax.random.PRNGKey(seed))
  return {p: {"a": ab["a"], "b": 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1 + i), ab["b"].shape)}
          for i, (p, ab) in enumerate(params.items())}


def test_zero_b_leaves_logits_unchanged():
  cfg = tiny_config(num_layers=3, vocab_size=256)
  lm = emjax.random_model(cfg, 0)
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="all")
  params = lora_lib.init_adapter(spec, cfg, jax.random.PRNGKey(0))
  assert all(float(jnp.abs(ab["a"]).max()) > 0 and float(jnp.abs(ab["b"]).max()) == 0 for ab in params.values())
  ids = rng_ids((2, 9))
  base = np.asarray(lm.logits(ids))
  adapted = lm.with_state(lm.state, lora=lora_lib.forward_lora(params, lora_lib.layer_scales(spec, cfg)))
  assert_same_computation(adapted.logits(ids), base)


def test_merged_logits_equal_unmerged_and_differ_from_base():
  cfg = tiny_config(num_layers=3, vocab_size=256)
  lm = emjax.random_model(cfg, 0)
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, rslora=True, targets="q,k,v,o,gate,up,down")
  lora = lora_lib.forward_lora(_random_adapter(spec, cfg), lora_lib.layer_scales(spec, cfg))
  ids = rng_ids((2, 9))
  unmerged = np.asarray(lm.with_state(lm.state, lora=lora).logits(ids))
  merged_lm = lm_lib.from_weights(cfg, lora_lib.merge_into_weights(lm.weights(), lora))
  merged = np.asarray(merged_lm.logits(ids))
  np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=1e-5)
  assert np.abs(merged - np.asarray(lm.logits(ids))).max() > 1e-3


def test_merge_matches_hand_computed_update():
  a = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)      # [L=2, In=3, R=1]
  b = np.array([[[1.0, -1.0]], [[2.0, 0.5]]], np.float32)           # [L, R=1, Out=2]
  scale = np.array([0.0, 3.0], np.float32)
  weights = {"down_proj": np.ones((2, 3, 2), np.float32), "embed": np.zeros((4, 3), np.float32)}
  merged = lora_lib.merge_into_weights(weights, {"down_proj": (a, b, scale)})
  np.testing.assert_array_equal(merged["down_proj"][0], np.ones((3, 2)))       # scale 0: untouched
  want = 1.0 + 3.0 * np.array([[3 * 2.0, 3 * 0.5], [4 * 2.0, 4 * 0.5], [5 * 2.0, 5 * 0.5]])
  np.testing.assert_allclose(merged["down_proj"][1], want)
  assert merged["embed"] is weights["embed"] and weights["down_proj"][1, 0, 0] == 1.0  # input not mutated


def test_traced_merge_equals_the_numpy_merge_and_keeps_bfloat16_adapters():
  """`merge_float32` (what generation does before decoding) = `merge_into_weights` (what export does)."""
  cfg = tiny_config(num_layers=3, vocab_size=256)
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="q,v,down")
  lora = lora_lib.forward_lora(_random_adapter(spec, cfg), lora_lib.layer_scales(spec, cfg))
  lm = emjax.random_model(cfg, 0)
  state, rest = jax.jit(lambda s, l: lora_lib.merge_float32(lm.graphdef, s, l))(lm.state, lora)
  assert rest is None
  want = lora_lib.merge_into_weights(lm.weights(), lora)
  got = lm.with_state(state).weights()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
  assert np.abs(got["q_proj"] - lm.weights()["q_proj"]).max() > 1e-3
  half = emjax.random_model(cfg, 0, dtype="bfloat16", param_dtype="bfloat16")
  state, rest = lora_lib.merge_float32(half.graphdef, half.state, lora)
  assert sorted(rest) == ["down_proj", "q_proj", "v_proj"]
  np.testing.assert_array_equal(half.with_state(state).weights()["q_proj"], half.weights()["q_proj"])


def test_generation_with_an_adapter_equals_generation_with_merged_weights():
  cfg = tiny_config(num_layers=2, vocab_size=256)
  lm = emjax.random_model(cfg, 0)
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="all")
  lora = lora_lib.forward_lora(_random_adapter(spec, cfg, seed=3), lora_lib.layer_scales(spec, cfg))
  adapted = lm.with_state(lm.state, lora=lora)
  merged = lm_lib.from_weights(cfg, lora_lib.merge_into_weights(lm.weights(), lora))
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  runs = [emjax.generate(m, prompts, max_new_tokens=8, temperature=1.0, seed=1, num_samples=2, stop_at_eos=False,
                         return_logprobs=True) for m in (adapted, merged, lm)]
  assert runs[0].token_ids == runs[1].token_ids
  for a, b in zip(runs[0].logprobs, runs[1].logprobs):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert runs[0].token_ids != runs[2].token_ids       # the adapter changes what is sampled


def test_rank1_layer_filter_touches_only_that_layer():
  cfg = tiny_config(num_layers=4, vocab_size=256)
  lm = emjax.random_model(cfg, 0)
  spec = lora_lib.LoraSpec(rank=1, alpha=1.0, targets="down", layers="2")
  params = lora_lib.init_adapter(spec, cfg, jax.random.PRNGKey(0))
  assert list(params) == ["down_proj"] and params["down_proj"]["a"].shape == (4, 64, 1)
  # B non-zero on *every* layer: the layer filter (scale 0) alone must keep layers 0, 1, 3 clean.
  params = _random_adapter(spec, cfg)
  lora = lora_lib.forward_lora(params, lora_lib.layer_scales(spec, cfg))
  base, merged = lm.weights(), lora_lib.merge_into_weights(lm.weights(), lora)
  changed = {(name, layer) for name in base if base[name].ndim == 3 for layer in range(4)
             if not np.array_equal(base[name][layer], merged[name][layer])}
  assert changed == {("down_proj", 2)}
  ids = rng_ids((1, 7))
  adapted = lm.with_state(lm.state, lora=lora)
  before, after = lm.residuals(ids, layers=(0, 1, 2, 3)), adapted.residuals(ids, layers=(0, 1, 2, 3))
  for layer in (0, 1):
    np.testing.assert_array_equal(np.asarray(after[layer]), np.asarray(before[layer]))
  assert np.abs(np.asarray(after[2]) - np.asarray(before[2])).max() > 1e-4


@pytest.mark.parametrize("targets,want", [
    ("all", lora_lib.PROJECTIONS), ("q,v", ("q_proj", "v_proj")), (["down_proj", "up"], ("up_proj", "down_proj")),
    ("mlp", ("gate_proj", "up_proj", "down_proj")), ("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    (".*_proj", lora_lib.PROJECTIONS), ("[qk]_proj", ("q_proj", "k_proj"))])
def test_resolve_targets(targets, want):
  assert lora_lib.resolve_targets(targets) == want


def test_resolve_layers_and_errors():
  assert lora_lib.resolve_layers(None, 30) == tuple(range(30))
  assert lora_lib.resolve_layers("24", 30) == (24,)
  assert lora_lib.resolve_layers("-1", 30) == (29,)
  assert lora_lib.resolve_layers("0-2,10", 30) == (0, 1, 2, 10)
  assert lora_lib.resolve_layers([3, -2], 30) == (3, 28)
  with pytest.raises(ValueError, match="layer 30 does not exist"):
    lora_lib.resolve_layers([30], 30)
  with pytest.raises(ValueError, match="matches no projection"):
    lora_lib.resolve_targets("qq")


def test_scaling_rslora_and_classic():
  assert lora_lib.scaling(lora_lib.LoraSpec(rank=32, alpha=64, rslora=True)) == pytest.approx(64 / np.sqrt(32))
  assert lora_lib.scaling(lora_lib.LoraSpec(rank=32, alpha=64, rslora=False)) == pytest.approx(2.0)
  scales = lora_lib.layer_scales(lora_lib.LoraSpec(rank=4, alpha=8, rslora=False, targets="q", layers="1"),
                                 tiny_config(num_layers=3))
  np.testing.assert_array_equal(np.asarray(scales["q_proj"]), [0.0, 2.0, 0.0])


def test_dropout_zero_is_identity_and_keeps_expectation():
  cfg = tiny_config(num_layers=2, vocab_size=256)
  params = lora_lib.init_adapter(lora_lib.LoraSpec(rank=2, targets="q"), cfg, jax.random.PRNGKey(0))
  assert lora_lib.apply_dropout(params, 0.0, jax.random.PRNGKey(1)) is params
  dropped = lora_lib.apply_dropout(params, 0.5, jax.random.PRNGKey(1))["q_proj"]["a"]
  kept_rows = np.asarray(jnp.any(dropped != 0, axis=-1))                   # [L, In]
  assert 0.3 < kept_rows.mean() < 0.7
  np.testing.assert_allclose(np.asarray(dropped)[kept_rows], 2.0 * np.asarray(params["q_proj"]["a"])[kept_rows])


def test_saved_adapter_loads_through_load_model(tmp_path):
  ref = tiny_hf_model("llama_gqa_tied")
  ref.save_pretrained(tmp_path / "base", safe_serialization=True)
  lm = emjax.load_model(str(tmp_path / "base"))
  spec = lora_lib.LoraSpec(rank=2, alpha=4.0, targets="q,down", layers="1-2")
  params = _random_adapter(spec, lm.config)
  lora_lib.save_adapter(str(tmp_path / "adapter"), params, spec, lm.config, base_model="tiny")
  ids = rng_ids((2, 8))
  want = np.asarray(lm.with_state(lm.state, lora=lora_lib.forward_lora(params, lora_lib.layer_scales(spec, lm.config)))
                    .logits(ids))
  again = emjax.load_model(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"))
  assert again.adapter_path == str(tmp_path / "adapter") and again.name.endswith("adapter")
  np.testing.assert_array_equal(np.asarray(again.logits(ids)), want)

  other = tiny_hf_model("llama_mha_untied")  # 4 KV heads: k_proj has another shape... q/down the same,
  other.config.intermediate_size = 96        # so change the MLP width to make the adapter not fit
  import transformers
  bigger = transformers.LlamaForCausalLM(other.config)
  bigger.save_pretrained(tmp_path / "other", safe_serialization=True)
  with pytest.raises(ValueError, match="this model needs"):
    emjax.load_model(str(tmp_path / "other"), adapter=str(tmp_path / "adapter"))
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    emjax.load_model(str(tmp_path / "base"), adapter=str(tmp_path))


def test_export_merged_reloads_in_transformers_with_same_logits(tmp_path):
  import transformers
  ref = tiny_hf_model("qwen2_bias_gqa")
  ref.save_pretrained(tmp_path / "base", safe_serialization=True)
  lm = emjax.load_model(str(tmp_path / "base"))
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="all")
  adapted = lm.with_state(lm.state, lora=lora_lib.forward_lora(_random_adapter(spec, lm.config),
                                                                lora_lib.layer_scales(spec, lm.config)))
  ids = rng_ids((2, 10))
  want = np.asarray(adapted.logits(ids))
  assert np.abs(want - torch_logits(ref, ids)).max() > 1e-3      # the adapter changes the model
  emjax.save_hf(adapted, str(tmp_path / "merged"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval().float()
  np.testing.assert_allclose(torch_logits(reloaded, ids), want, atol=1e-4, rtol=1e-4)
