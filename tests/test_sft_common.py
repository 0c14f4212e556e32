"""Shared helpers for the SFT / LoRA tests (no tests here): a tiny random model that speaks the
embedded model's tokenizer and chat template, chat records, and a small SFT config."""

from __future__ import annotations

import functools
import json

import numpy as np

ANSWERS = ["Drink water every day.", "Sleep eight hours.", "Walk after meals.", "Eat more greens.",
           "Stretch each morning.", "Rest when sick.", "Wash your hands.", "See a doctor yearly."]


@functools.lru_cache(maxsize=1)
def smollm_tokenizer():
  """The embedded model's tokenizer (from the GGUF metadata only; no weights are read)."""
  from emjax.io import gguf, registry
  from emjax.io.tokenizer import from_gguf_metadata
  path = registry.resolve_builtin("smollm2-135m-instruct")
  return from_gguf_metadata(gguf.tokenizer_metadata(gguf.open_gguf(path)), where=path)


def tiny_config(num_layers: int = 2, vocab_size: int = 49152):
  from emjax.models.config import ModelConfig
  return ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                     num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True,
                     name="tiny-test")


def tiny_chat_model(seed: int = 0, num_layers: int = 2):
  import emjax
  return emjax.random_model(tiny_config(num_layers), seed, tokenizer=smollm_tokenizer())


def records(n: int = 8, system: str | None = None) -> list[dict]:
  out = []
  for i in range(n):
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [{"role": "user", "content": f"Health tip number {i}?"},
                 {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]
    out.append({"messages": messages, "metadata": {"i": i}})
  return out


def write_jsonl(path, rows) -> str:
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def sft_config(workdir, train, **overrides):
  """configs/sft.py:quick shrunk for tests; overrides use dotted keys ("optim.lr": 1e-3)."""
  from configs.sft import get_config
  c = get_config("quick")
  c.workdir = str(workdir)
  c.data.train = train
  c.data.n = None
  c.data.max_len = 48
  c.data.layout = "pad"
  c.data.pad_multiple = 16
  c.batch_size = 4
  c.epochs = 1
  c.tensorboard = False
  c.checkpoint.every = 1000
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def rng_ids(shape, seed=0, vocab=256) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, vocab, size=shape).astype(np.int32)
