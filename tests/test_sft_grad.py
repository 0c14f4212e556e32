"""Gradients of the emjax SFT loss vs a PyTorch/transformers reference on a tiny random model."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import emjax
from emjax.models import lora as lora_lib
from emjax.train import batching, sft
from tests.hf_tiny import tiny_hf_model

# emjax name -> (torch parameter name pattern for layer l, transpose?)
_TORCH_NAMES = {"q_proj": "model.layers.{l}.self_attn.q_proj.weight", "down_proj": "model.layers.{l}.mlp.down_proj.weight",
                "v_proj": "model.layers.{l}.self_attn.v_proj.weight", "input_norm": "model.layers.{l}.input_layernorm.weight"}


def _batch(seed=0):
  """Two right-padded rows, loss only on a 'completion' span (like assistant tokens)."""
  rng = np.random.default_rng(seed)
  lengths, prompt = [12, 8], [5, 3]
  examples = []
  for n, p in zip(lengths, prompt):
    ids = rng.integers(3, 256, size=n + 1).astype(np.int32)
    mask = np.zeros(n + 1, np.int32)
    mask[p:] = 1
    examples.append(batching.Example(ids[:-1], ids[1:], mask[1:].astype(np.float32)))
  return batching._rows_to_batch([[e] for e in examples], 12, 1, 0), examples


def _torch_loss_and_grads(model, examples):
  import torch
  model.zero_grad()
  total, count = 0.0, 0.0
  for ex in examples:  # one row at a time: no padding in the reference at all
    ids = torch.tensor(np.concatenate([ex.inputs, ex.targets[-1:]])[None], dtype=torch.long)
    logits = model(ids).logits[0, :-1].float()
    losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ex.targets, dtype=torch.long), reduction="none")
    total = total + (losses * torch.tensor(ex.weights)).sum()
    count += float(ex.weights.sum())
  loss = total / count
  loss.backward()
  return float(loss.detach()), {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}


def _emjax_loss_fn(lm, batch):
  device = sft.batch_to_device(batch)
  micro = {k: v[0] for k, v in device.items()}
  total = jnp.sum(micro["weights"])

  def loss(state, lora=None):
    s, _ = sft.batch_loss_sums(lm.graphdef, state, micro, lora=lora, compute_dtype=jnp.float32)
    return s / total
  return loss


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_bias_gqa"])
def test_full_ft_gradients_match_transformers(variant, tmp_path):
  ref = tiny_hf_model(variant)
  ref.save_pretrained(tmp_path, safe_serialization=True)
  lm = emjax.load_model(str(tmp_path))
  batch, examples = _batch()
  want_loss, want = _torch_loss_and_grads(ref, examples)
  loss, grads = jax.value_and_grad(_emjax_loss_fn(lm, batch))(lm.state)
  assert float(loss) == pytest.approx(want_loss, rel=1e-5)
  got = jax.tree.map(np.asarray, emjax.LanguageModel.weights(lm.with_state(grads)))
  for name, pattern in _TORCH_NAMES.items():
    for layer in range(lm.config.num_layers):
      ref_grad = want[pattern.format(l=layer)]
      ref_grad = ref_grad.T if ref_grad.ndim == 2 else ref_grad
      scale = np.abs(ref_grad).max()
      np.testing.assert_allclose(got[name][layer], ref_grad, atol=1e-5 * max(scale, 1e-3), rtol=1e-4,
                                 err_msg=f"{name} layer {layer}")
  np.testing.assert_allclose(got["embed"], want["model.embed_tokens.weight"], atol=1e-6, rtol=1e-4)


def test_lora_gradients_follow_chain_rule_from_transformers_weight_gradients(tmp_path):
  """W_eff = W + s A B, so dL/dB = s A^T dL/dW and dL/dA = s dL/dW B^T, with dL/dW from torch."""
  ref = tiny_hf_model("llama_mha_untied")
  ref.save_pretrained(tmp_path, safe_serialization=True)
  lm = emjax.load_model(str(tmp_path))
  batch, examples = _batch(seed=1)
  _, want = _torch_loss_and_grads(ref, examples)  # at B = 0 the adapted model is the base model
  spec = lora_lib.LoraSpec(rank=3, alpha=6.0, rslora=True, targets="q,down")
  scales = lora_lib.layer_scales(spec, lm.config)
  params = lora_lib.init_adapter(spec, lm.config, jax.random.PRNGKey(0))
  loss_fn = _emjax_loss_fn(lm, batch)
  grads = jax.grad(lambda p: loss_fn(lm.state, lora_lib.forward_lora(p, scales)))(params)
  s = lora_lib.scaling(spec)
  for name in ("q_proj", "down_proj"):
    for layer in range(lm.config.num_layers):
      dw = want[_TORCH_NAMES[name].format(l=layer)].T                      # [In, Out]
      a = np.asarray(params[name]["a"][layer])
      np.testing.assert_allclose(np.asarray(grads[name]["b"][layer]), s * a.T @ dw, atol=1e-6, rtol=1e-4)
      np.testing.assert_array_equal(np.asarray(grads[name]["a"][layer]), 0.0)  # B = 0 -> dL/dA = 0


def test_masked_prompt_targets_get_no_gradient(tmp_path):
  """Changing the target tokens where the loss mask is 0 changes neither the loss nor any gradient."""
  ref = tiny_hf_model("llama_gqa_tied")
  ref.save_pretrained(tmp_path, safe_serialization=True)
  lm = emjax.load_model(str(tmp_path))
  batch, _ = _batch()
  scrambled_targets = np.where(batch.weights > 0, batch.targets,
                               np.random.default_rng(9).integers(3, 256, size=batch.targets.shape)).astype(np.int32)
  assert (scrambled_targets != batch.targets).sum() > 4
  scrambled = batching.Batch(batch.inputs, scrambled_targets, batch.weights, batch.attention_mask, batch.positions,
                             batch.segment_ids)
  loss_a, grads_a = jax.value_and_grad(_emjax_loss_fn(lm, batch))(lm.state)
  loss_b, grads_b = jax.value_and_grad(_emjax_loss_fn(lm, scrambled))(lm.state)
  assert float(loss_a) == float(loss_b)
  jax.tree.map(np.testing.assert_array_equal, grads_a, grads_b)
  # ...while the same change with the loss on every token does change the loss.
  everywhere = batching.Batch(batch.inputs, scrambled_targets, batch.attention_mask.astype(np.float32),
                              batch.attention_mask, batch.positions, batch.segment_ids)
  original_everywhere = batching.Batch(batch.inputs, batch.targets, batch.attention_mask.astype(np.float32),
                                       batch.attention_mask, batch.positions, batch.segment_ids)
  assert float(_emjax_loss_fn(lm, everywhere)(lm.state)) != float(_emjax_loss_fn(lm, original_everywhere)(lm.state))
