"""`forward_shared_prompts` (each prompt computed once for its G continuations, both token sets
sharing every layer's matmuls) equals the plain forward over the concatenated rows: what GRPO's
prompt sharing relies on, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import emjax
from emjax.models import lora as lora_lib
from emjax.models import transformer
from tests.test_sft_common import tiny_config

P, C, U, G = 8, 5, 2, 3


def _rows(vocab):
  rng = np.random.default_rng(0)
  prompt = rng.integers(3, vocab, (U, P)).astype(np.int32)
  prompt_mask = np.ones((U, P), bool)
  prompt_mask[0, :3] = False                                              # left padding
  completion = rng.integers(3, vocab, (U * G, C)).astype(np.int32)
  completion_mask = np.ones((U * G, C), bool)
  completion_mask[1, 3:] = False                                          # right padding
  return prompt, prompt_mask, completion, completion_mask


def _lora(cfg):
  spec = lora_lib.LoraSpec(rank=4, alpha=8.0, targets="all")
  adapter = lora_lib.init_adapter(spec, cfg, jax.random.PRNGKey(0))
  adapter = {p: {"a": ab["a"], "b": 0.3 * jax.random.normal(jax.random.PRNGKey(1), ab["b"].shape)}
             for p, ab in adapter.items()}
  return adapter, lora_lib.layer_scales(spec, cfg)


def test_shared_prompt_forward_equals_the_full_rows():
  cfg = tiny_config(num_layers=3, vocab_size=256)
  lm = emjax.random_model(cfg, 0)
  prompt, prompt_mask, completion, completion_mask = _rows(256)
  adapter, scales = _lora(cfg)
  lora = lora_lib.forward_lora(adapter, scales)
  row_prompt_mask = np.repeat(prompt_mask, G, 0)
  full = transformer.forward(lm.graphdef, lm.state, np.concatenate([np.repeat(prompt, G, 0), completion], 1),
                             np.concatenate([row_prompt_mask, completion_mask], 1), lora=lora).logits  # [U*G, P+C, V]
  last, logits = transformer.forward_shared_prompts(lm.graphdef, lm.state, prompt, prompt_mask, completion,
                                                    completion_mask, group_size=G, lora=lora)
  assert last.shape == (U, cfg.vocab_size) and logits.shape == (U * G, C, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(logits)[completion_mask], np.asarray(full[:, P:])[completion_mask],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(last), np.asarray(full[::G, P - 1]), atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(full[0, P:]) - np.asarray(full[G, P:])).max() > 1e-3   # the two prompts differ

  with pytest.raises(ValueError, match="group_size"):
    transformer.forward_shared_prompts(lm.graphdef, lm.state, prompt, prompt_mask, completion[:4],
                                       completion_mask[:4], group_size=G)


def test_shared_prompt_forward_has_the_full_rows_gradient():
  """d(sum of continuation log-probs)/d(adapter) through the shared prompts equals the full rows' one."""
  cfg = tiny_config(num_layers=2, vocab_size=128)
  lm = emjax.random_model(cfg, 1)
  prompt, prompt_mask, completion, completion_mask = _rows(128)
  adapter, scales = _lora(cfg)
  weights = jnp.asarray(completion_mask, jnp.float32)

  def shared(params):
    _, logits = transformer.forward_shared_prompts(lm.graphdef, lm.state, prompt, prompt_mask, completion,
                                                   completion_mask, group_size=G,
                                                   lora=lora_lib.forward_lora(params, scales))
    return jnp.sum(jax.nn.log_softmax(logits)[..., 7] * weights)

  def full(params):
    ids = np.concatenate([np.repeat(prompt, G, 0), completion], 1)
    mask = np.concatenate([np.repeat(prompt_mask, G, 0), completion_mask], 1)
    logits = transformer.forward(lm.graphdef, lm.state, ids, mask, lora=lora_lib.forward_lora(params, scales)).logits
    return jnp.sum(jax.nn.log_softmax(logits[:, P:])[..., 7] * weights)

  for got, want in zip(jax.tree.leaves(jax.grad(shared)(adapter)), jax.tree.leaves(jax.grad(full)(adapter))):
    assert np.abs(np.asarray(want)).max() > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)
