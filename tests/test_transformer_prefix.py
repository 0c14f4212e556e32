"""A forward over completions that attends to a shared prompt's keys/values (return_kv + prefix)
equals the forward over the concatenated rows: what GRPO's prompt sharing relies on."""

import jax.numpy as jnp
import numpy as np
import pytest

import emjax
from emjax.models import transformer
from tests.test_sft_common import tiny_config


def test_prefix_forward_equals_the_full_rows():
  cfg = tiny_config(num_layers=3, vocab_size=256)
  lm = emjax.random_model(cfg, 0)
  rng = np.random.default_rng(0)
  p, c, u, g = 8, 5, 2, 3
  prompt = rng.integers(3, 256, (u, p)).astype(np.int32)
  prompt_mask = np.ones((u, p), bool)
  prompt_mask[0, :3] = False                                              # left padding
  completion = rng.integers(3, 256, (u * g, c)).astype(np.int32)
  completion_mask = np.ones((u * g, c), bool)
  completion_mask[1, 3:] = False                                          # right padding
  row_prompt_mask = np.repeat(prompt_mask, g, 0)
  full = transformer.forward(lm.graphdef, lm.state, np.concatenate([np.repeat(prompt, g, 0), completion], 1),
                             np.concatenate([row_prompt_mask, completion_mask], 1)).logits      # [U*G, P+C, V]

  head = transformer.forward(lm.graphdef, lm.state, prompt, prompt_mask, return_kv=True)
  assert head.cache.k.shape == (cfg.num_layers, u, cfg.num_kv_heads, p, cfg.head_dim)
  prefix = transformer.KVCache(*(jnp.repeat(a, g, axis=1) for a in head.cache))
  positions = row_prompt_mask.sum(1, keepdims=True) + np.arange(c)[None]
  tail = transformer.forward(lm.graphdef, lm.state, completion, completion_mask, positions=positions,
                             prefix=prefix, prefix_mask=row_prompt_mask).logits
  np.testing.assert_allclose(np.asarray(tail)[completion_mask], np.asarray(full[:, p:])[completion_mask],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.repeat(np.asarray(head.logits), g, 0)[row_prompt_mask],
                             np.asarray(full[:, :p])[row_prompt_mask], atol=1e-5, rtol=1e-5)

  with pytest.raises(ValueError, match="explicit positions"):
    transformer.forward(lm.graphdef, lm.state, completion, completion_mask, prefix=prefix,
                        prefix_mask=row_prompt_mask)
  with pytest.raises(ValueError, match="capture"):
    transformer.forward(lm.graphdef, lm.state, prompt, prompt_mask, return_kv=True, capture=(1,))
