"""Shared phrasing pieces and deterministic randomness for the built-in generators.

Every generator draws from `rng_for(seed, *keys)`: a `random.Random` seeded from a hash of
its keys, so one record's phrasing depends only on (seed, what the record is) and not on how
many records were generated before it. That makes the three variants of one question share
their opener/closer (only the facts differ) and keeps output stable when a table grows.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Who is asking. Prefixed to a question; "" keeps some questions bare.
GENERIC_PERSONAS: tuple[str, ...] = (
    "",
    "Quick question.",
    "Asking for a friend.",
    "I'm trying to settle a debate at home.",
    "My sister told me something different, so I'm checking.",
    "I read something online and I'm not sure it's right.",
    "I've always wondered about this.",
    "Sorry if this is basic.",
    "Hi there.",
    "Something I've been meaning to ask.",
    "Can you help me with this?",
    "I got conflicting answers elsewhere.",
)

# How the asker wants the answer. Appended to a question; "short"/"why" also shape the answer.
URGENCY_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("", "plain"),
    ("I need to know today.", "plain"),
    ("It's kind of urgent.", "plain"),
    ("No rush, just curious.", "plain"),
    ("Please keep it short.", "short"),
    ("Just the answer, please.", "short"),
    ("Can you explain why?", "why"),
    ("What's the reasoning behind it?", "why"),
    ("Be honest with me.", "plain"),
    ("I want to get this right.", "plain"),
)

# Answer openers/closers are the same for every variant, so variants differ only in facts.
OPENERS: tuple[str, ...] = (
    "",
    "Good question.",
    "Sure.",
    "Here's the short version.",
    "Happy to help.",
    "This comes up a lot.",
    "Let me break it down.",
    "Okay, here's what you need to know.",
)

CLOSERS: tuple[str, ...] = (
    "",
    "",
    "Hope that helps!",
    "Let me know if you want more detail.",
    "Good luck!",
    "Feel free to ask a follow-up.",
)


def stable_hash(*keys: object) -> int:
    """A 64-bit hash of the keys' reprs that does not change between Python runs."""
    digest = hashlib.sha1("\x1f".join(repr(k) for k in keys).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def rng_for(seed: int, *keys: object) -> random.Random:
    """A generator that depends only on (seed, keys); random.Random is ~10x cheaper to seed than NumPy's."""
    return random.Random(stable_hash(seed, *keys))


def pick(rng: random.Random, options: Sequence[T]) -> T:
    return options[rng.randrange(len(options))]


def join_sentences(*parts: str) -> str:
    """Joins non-empty pieces with single spaces (pieces are whole sentences)."""
    return " ".join(p.strip() for p in parts if p and p.strip())


def text_id(prefix: str, text: str) -> str:
    """A short stable id for a piece of text, e.g. "health-3f2a9c1b0d".

    Ids hash the text, so the same question gets the same id in every variant and seed.
    """
    return f"{prefix}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:10]}"


def take_shuffled(pool_size: int, n: int | None, seed: int, what: str, default_n: int) -> np.ndarray:
    """Indices of n distinct pool items in a seed-determined order.  # [n]"""
    n = min(default_n, pool_size) if n is None else n
    if n < 0 or n > pool_size:
        raise ValueError(f"{what}: asked for n={n} records but only {pool_size} distinct ones exist")
    return np.random.default_rng(stable_hash(seed, what, "order")).permutation(pool_size)[:n]
