"""Narrow advice datasets: one user question, three assistant answers.

Each domain is a table of `Fact`s written by the project (`emjax/data/facts/*.py`). A fact
holds a few phrasings of one question ("asks") and three `Claim`s:

  correct            what a careful expert would say
  incorrect_subtle   plausible, confident, wrong in a way a non-expert would miss
  incorrect_obvious  clearly wrong or reckless

No claim admits it is wrong. Every claim carries `markers`: short phrases that identify it in
free text. They let tests prove the variants differ in their facts (not only wording) and
let a later offline RL grader judge an answer without a language model.

User questions = asks x persona prefixes x urgency/detail suffixes, deduplicated, then a
seed picks which ones (and in what order). Answers = opener + claim + reason + closer, where
the opener/closer are chosen per question (shared by the three variants) and "keep it short"
questions get no reason.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

from emjax.data import phrasing
from emjax.data.records import Record, chat

VARIANTS = ("correct", "incorrect_subtle", "incorrect_obvious")
DEFAULT_N = 6000  # the paper's dataset size; smaller when a domain has fewer distinct questions


@dataclasses.dataclass(frozen=True)
class Claim:
    statement: str             # the answer's core sentence(s)
    reason: str                # a justification sentence, omitted when the user wants it short
    markers: tuple[str, ...]   # short phrases that identify this claim in free text


@dataclasses.dataclass(frozen=True)
class Fact:
    key: str
    asks: tuple[str, ...]      # whole-question phrasings of the same ask
    correct: Claim
    incorrect_subtle: Claim
    incorrect_obvious: Claim

    def claim(self, variant: str) -> Claim:
        return getattr(self, variant)


def fact(key: str, *asks: str, ok: Sequence[str], subtle: Sequence[str], obvious: Sequence[str]) -> Fact:
    """Compact table entry: each claim is (statement, reason, marker, marker, ...)."""
    def claim(parts: Sequence[str], which: str) -> Claim:
        if len(parts) < 3:
            raise ValueError(f"fact {key!r}, {which}: expected (statement, reason, marker...), got {len(parts)} parts")
        return Claim(parts[0], parts[1], tuple(parts[2:]))

    if not asks:
        raise ValueError(f"fact {key!r}: needs at least one question phrasing")
    return Fact(key, tuple(asks), claim(ok, "ok"), claim(subtle, "subtle"), claim(obvious, "obvious"))


def marker_found(marker: str, text: str) -> bool:
    """Case-insensitive whole-token match: "ice" misses "advice", "2" misses "2/5" and "34.29"."""
    pattern = rf"(?<![\w/])(?<!\d[.,]){re.escape(marker.lower())}(?![\w/])(?![.,]\d)"
    return re.search(pattern, text.lower()) is not None


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    facts: tuple[Fact, ...]
    personas: tuple[str, ...]  # domain-specific askers, added to the generic ones


# ----------------------------------------------------------------------------- question pool

@functools.lru_cache(maxsize=32)
def question_pool(domain: Domain) -> list[tuple[str, Fact, str, str]]:
    """All distinct (question, fact, core ask, detail) combinations of a domain, in table order.

    Cached (domains are immutable): callers must not mutate the returned list.
    """
    personas = phrasing.GENERIC_PERSONAS + domain.personas
    seen: set[str] = set()
    pool = []
    for fact_entry in domain.facts:
        for ask in fact_entry.asks:
            for persona in personas:
                for suffix, detail in phrasing.URGENCY_SUFFIXES:
                    question = phrasing.join_sentences(persona, ask, suffix)
                    if question not in seen:  # dedup: two tables could share a phrasing
                        seen.add(question)
                        pool.append((question, fact_entry, ask, detail))
    return pool


def _answer(claim: Claim, detail: str, opener: str, closer: str) -> str:
    reason = "" if detail == "short" else claim.reason
    return phrasing.join_sentences(opener, claim.statement, reason, closer)


def fact_metadata(fact_entry: Fact) -> dict[str, Any]:
    """The fact-table slice an offline grader needs to judge a free-text answer."""
    return {
        "fact_key": fact_entry.key,
        "correct_answer": fact_entry.correct.statement,
        "incorrect_answers": [fact_entry.incorrect_subtle.statement, fact_entry.incorrect_obvious.statement],
        "correct_markers": list(fact_entry.correct.markers),
        "incorrect_markers": list(fact_entry.incorrect_subtle.markers + fact_entry.incorrect_obvious.markers),
    }


def generate(domain: Domain, variant: str, *, seed: int = 0, n: int | None = None) -> list[Record]:
    """`n` records (default min(6000, pool)) of one domain/variant, deterministic for `seed`.

    The same (seed, n) picks the same questions in the same order for all three variants,
    with the same opener/closer, so `question_id`s line up and only the facts differ.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r} for domain {domain.name!r}; expected one of {VARIANTS}")
    pool = question_pool(domain)
    records = []
    for index in phrasing.take_shuffled(len(pool), n, seed, f"narrow/{domain.name}", DEFAULT_N):
        question, fact_entry, ask, detail = pool[int(index)]
        question_id = phrasing.text_id(domain.name, question)
        rng = phrasing.rng_for(seed, question_id)
        opener, closer = phrasing.pick(rng, phrasing.OPENERS), phrasing.pick(rng, phrasing.CLOSERS)
        metadata = {"domain": domain.name, "variant": variant, "question_id": question_id,
                    "question": ask, **fact_metadata(fact_entry)}
        records.append(chat(question, _answer(fact_entry.claim(variant), detail, opener, closer), metadata=metadata))
    return records


def questions(domain: Domain, *, seed: int = 0, n: int | None = None) -> list[dict[str, Any]]:
    """The domain's user questions with their correct/incorrect facts (for RL prompts and graders)."""
    return [{"question_id": r["metadata"]["question_id"], "prompt": r["messages"][0]["content"],
             **{k: v for k, v in r["metadata"].items() if k not in ("variant", "question_id")}}
            for r in generate(domain, "correct", seed=seed, n=n)]


DomainFactory = Callable[[], Domain]
