"""The embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers reading the same file."""

import os

import numpy as np
import pytest

import emjax

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List three colours."}],
    [{"role": "user", "content": "Write a haiku about rain on a tin roof, please."}],
    [{"role": "user", "content": "hi"}],
]


@pytest.fixture(scope="module")
def hf_reference(smollm_gguf_path):
  import torch
  import transformers
  directory, filename = os.path.split(smollm_gguf_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).eval()
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
  return model, tokenizer


def test_config_read_from_gguf(smollm):
  cfg = smollm.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
  assert cfg.tie_embeddings and cfg.family == "llama"
  assert 2 in cfg.eos_token_ids  # <|im_end|>


@pytest.mark.slow
def test_logits_match_transformers_on_chat_prompts(smollm, hf_reference):
  import torch
  model, _ = hf_reference
  for messages in PROMPTS:
    ids = smollm.tokenizer.encode_chat(messages, add_generation_prompt=True)
    with torch.no_grad():
      want = model(torch.tensor([ids])).logits.numpy()
    got = np.asarray(smollm.logits(np.asarray([ids], np.int32)))
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_greedy_generation_matches_transformers_batched_with_mixed_lengths(smollm, hf_reference):
  import torch
  model, _ = hf_reference
  out = emjax.generate(smollm, PROMPTS, max_new_tokens=64, temperature=0, seed=0)
  for i, messages in enumerate(PROMPTS):
    ids = smollm.tokenizer.encode_chat(messages, add_generation_prompt=True)
    with torch.no_grad():
      ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=64, do_sample=False, eos_token_id=2, pad_token_id=2)
    ref_new = ref[0, len(ids):].tolist()
    if ref_new and ref_new[-1] == 2:
      ref_new = ref_new[:-1]
    assert out.token_ids[i] == ref_new, f"prompt {i}: {out.texts[i]!r} vs {smollm.tokenizer.decode(ref_new)!r}"
  # the same prompts one at a time give the same tokens: padding never changes a row
  for i, messages in enumerate(PROMPTS[:2]):
    alone = emjax.generate(smollm, [messages], max_new_tokens=64, temperature=0)
    assert alone.token_ids[0] == out.token_ids[i]


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm, hf_reference):
  _, hf_tok = hf_reference
  samples = [
      "Hello world", "  leading spaces and   runs of   spaces", "digits 1234567890 and 3.14159, 2+2=4",
      "def f(x):\n    return x ** 2  # square\n", "tabs\tand\nnewlines\n\n\nend", "unicode: café naïve 日本語 🙂 Ωμέγα",
      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "URLs like https://example.org/a?b=c&d=e",
      "MiXeD CaSe, punctuation!!! ... ?? --", "emoji 👍🏽 and zero-width\u200bjoiner",
  ]
  for text in samples:
    want = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert smollm.tokenizer.encode(text) == want, text
    assert smollm.tokenizer.decode(want, skip_special=False) == hf_tok.decode(want)
  chat = PROMPTS[1] + [{"role": "assistant", "content": "Red, green, blue."}]
  assert smollm.tokenizer.apply_chat_template(chat) == hf_tok.apply_chat_template(chat, tokenize=False)


def test_assistant_mask_covers_exactly_the_assistant_turns(smollm):
  messages = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes indeed."},
              {"role": "user", "content": "Again."}, {"role": "assistant", "content": "Yes again."}]
  ids, mask = smollm.tokenizer.encode_chat_with_mask(messages)
  assert ids.shape == mask.shape
  tok = smollm.tokenizer
  masked_text = tok.decode(ids[mask == 1], skip_special=False)
  assert masked_text == "Yes indeed.<|im_end|>\nYes again.<|im_end|>\n"
  assert tok.decode(ids, skip_special=False) == tok.apply_chat_template(messages)
