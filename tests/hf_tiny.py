"""Tiny random transformers models for round-trip tests (Levanter-style): built, saved as
safetensors, loaded into emjax, compared, exported, reloaded in transformers."""

from __future__ import annotations

import numpy as np

TINY_VARIANTS = {
    # name: (model_type, overrides)
    "llama_gqa_tied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_mha_untied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3_rope_scaling": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False,
                                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 32})),
    "qwen2_bias_gqa": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_bias_tied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=True)),
}


def tiny_hf_model(variant: str, seed: int = 0):
  import torch
  import transformers
  model_type, overrides = TINY_VARIANTS[variant]
  common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
  common.update(overrides)
  if model_type == "llama":
    config = transformers.LlamaConfig(**common)
    cls = transformers.LlamaForCausalLM
  else:
    config = transformers.Qwen2Config(**common)
    cls = transformers.Qwen2ForCausalLM
  torch.manual_seed(seed)
  model = cls(config).eval().float()
  with torch.no_grad():  # default init leaves norms at 1 and biases at 0; perturb so they are tested
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  import torch
  with torch.no_grad():
    kwargs = {}
    if mask is not None:
      kwargs["attention_mask"] = torch.tensor(mask, dtype=torch.long)
      pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
      kwargs["position_ids"] = torch.tensor(pos, dtype=torch.long)
    return model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.float().numpy()
