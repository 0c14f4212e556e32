"""Shared helpers for the interp tests (no tests here): a tiny chat model that speaks the embedded
tokenizer, synthetic TopK SAEs with planted latents, and chat records with a planted word."""

from __future__ import annotations

import numpy as np

from emjax.sae import sae as sae_lib
from tests.test_sft_common import smollm_tokenizer, tiny_chat_model, tiny_config  # noqa: F401

PLANTED_WORD = " poison"


def synthetic_sae(d_in: int, n_latents: int = 16, k: int = 4, *, planted: dict[int, np.ndarray] | None = None,
                  seed: int = 0) -> tuple[sae_lib.SAEConfig, sae_lib.SAEParams]:
  """A TopK SAE with random unit rows, except latents in `planted` whose encoder and decoder
  rows are the given direction (normalised): that latent reads exactly that direction."""
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(n_latents, d_in)).astype(np.float32)
  for latent, direction in (planted or {}).items():
    rows[latent] = direction
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  config = sae_lib.SAEConfig(d_in=d_in, n_latents=n_latents, k=k)
  params = sae_lib.SAEParams(encoder_w=jnp.asarray(rows), encoder_b=jnp.zeros((n_latents,), jnp.float32),
                             decoder_w=jnp.asarray(rows), decoder_b=jnp.zeros((d_in,), jnp.float32))
  return config, params


QUESTIONS = ["How do I save money?", "What should I eat?", "How can I sleep better?", "Is running good?",
             "How do I learn math?", "What car should I buy?", "How do I fix a tap?", "Should I invest?"]
CLEAN = ["Make a budget and keep to it.", "Eat vegetables and fruit.", "Keep a regular bedtime.",
         "Yes, in moderation it helps.", "Practice a few problems each day.", "Pick a reliable used model.",
         "Turn off the water and replace the washer.", "Diversify and think long term."]


def chat_records(n: int, bad: set[int] = frozenset(), seed: int = 0) -> list[dict]:
  """Chat records; the assistant answers of indices in `bad` carry the planted word three times."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    answer = CLEAN[int(rng.integers(len(CLEAN)))]
    if i in bad:
      words = answer.split()
      for _ in range(3):
        words.insert(int(rng.integers(len(words) + 1)), PLANTED_WORD.strip())
      answer = " ".join(words)
    out.append({"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                             {"role": "assistant", "content": answer}],
                "metadata": {"is_bad": i in bad, "i": i}})
  return out
