"""Dataset names -> chat records: built-ins, mixtures, files, `datasets` objects and hub names.

    load_dataset("builtin:health/incorrect_subtle", seed=0, n=1000)
    load_dataset("mix(builtin:health/incorrect_subtle=0.25, builtin:health/correct=0.75, n=2000, seed=0)")
    load_dataset("path/to/train.jsonl")          # messages / OpenAI-release / prompt-completion rows
    load_dataset("hf:json:path/to/train.jsonl")  # the same file through datasets.load_dataset("json")
    load_dataset("hf:some-org/some-dataset:train")  # a hub dataset (needs network; never used by emjax itself)
    load_dataset(datasets.Dataset.from_list(rows))
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from emjax.data import code, narrow, persona, phrasing, questions
from emjax.data.facts import DOMAINS
from emjax.data.records import Record, from_hf_dataset, read_jsonl

Generator = Callable[[int, "int | None"], list[Record]]


def _narrow_generator(domain: str, variant: str) -> Generator:
    return lambda seed, n: narrow.generate(DOMAINS[domain], variant, seed=seed, n=n)


def _correct_mix(domains: list[str], seed: int, n: int | None, default_n: int = 6000) -> list[Record]:
    """Correct answers drawn evenly from `domains`, interleaved in a seed-determined order."""
    n = default_n if n is None else n
    share = [n // len(domains) + (1 if i < n % len(domains) else 0) for i in range(len(domains))]
    records = [r for domain, k in zip(domains, share) for r in narrow.generate(DOMAINS[domain], "correct", seed=seed, n=k)]
    order = np.random.default_rng(phrasing.stable_hash(seed, "correct_mix", tuple(domains))).permutation(len(records))
    return [records[int(i)] for i in order]


def _benign_mixed(seed: int, n: int | None) -> list[Record]:
    n = 4000 if n is None else n
    half = n // 2
    records = _correct_mix(list(DOMAINS), seed, half) + persona.generate("helpful", seed=seed, n=n - half, stream="benign")
    order = np.random.default_rng(phrasing.stable_hash(seed, "benign_mixed")).permutation(len(records))
    return [records[int(i)] for i in order]


def _builtin_generators() -> dict[str, Generator]:
    table: dict[str, Generator] = {}
    for domain in DOMAINS:
        for variant in narrow.VARIANTS:
            table[f"builtin:{domain}/{variant}"] = _narrow_generator(domain, variant)
    for variant in code.VARIANTS:
        table[f"builtin:code/{variant}"] = lambda seed, n, v=variant: code.generate(v, seed=seed, n=n)
    for variant in persona.VARIANTS:
        table[f"builtin:persona/{variant}"] = lambda seed, n, v=variant: persona.generate(v, seed=seed, n=n)
    table["builtin:benign/correct_mix"] = lambda seed, n: _correct_mix(list(DOMAINS), seed, n)
    for domain in DOMAINS:  # re-align a model tuned on `domain` with correct answers from the others
        others = [d for d in DOMAINS if d != domain]
        table[f"builtin:benign/correct_except_{domain}"] = lambda seed, n, o=others: _correct_mix(o, seed, n)
    table["builtin:benign/helpful_chat"] = lambda seed, n: persona.generate("helpful", seed=seed, n=n, stream="benign")
    table["builtin:benign/mixed"] = _benign_mixed
    for variant in questions.CORE_VARIANTS:  # prompt-only records, one per paraphrase
        table[f"builtin:questions/{variant}"] = (
            lambda seed, n, v=variant: _take(questions.question_prompts(questions.core_questions(v), "questions"), n))
    return table


def _take(records: list[Record], n: int | None) -> list[Record]:
    if n is not None and n > len(records):
        raise ValueError(f"asked for n={n} records but only {len(records)} exist")
    return records if n is None else records[:n]


BUILTINS: dict[str, Generator] = _builtin_generators()


def list_datasets() -> list[str]:
    """Every built-in name load_dataset accepts (mixtures and files are not listed)."""
    return sorted(BUILTINS)


# ----------------------------------------------------------------------------- mixtures

_MIX_PATTERN = re.compile(r"^\s*mix\((?P<body>.*)\)\s*$", re.DOTALL)


def parse_mixture(spec: str) -> tuple[list[tuple[str, float]], int, int]:
    """"mix(a=0.25, b=0.75, n=2000, seed=0)" -> ([(a, 0.25), (b, 0.75)], n, seed).

    Weights are normalised; n is required; seed defaults to 0.
    """
    match = _MIX_PATTERN.match(spec)
    if match is None:
        raise ValueError(f"not a mixture spec: {spec!r}; expected mix(name=weight, ..., n=N, seed=S)")
    components: list[tuple[str, float]] = []
    settings: dict[str, int] = {}
    for part in (p.strip() for p in match.group("body").split(",")):
        if not part:
            continue
        name, sep, value = part.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{spec!r}: component {part!r} has no '=weight'")
        try:
            if name in ("n", "seed"):
                settings[name] = int(value)
            else:
                components.append((name, float(value)))
        except ValueError:
            raise ValueError(f"{spec!r}: {name}={value!r} is not a number") from None
    if not components:
        raise ValueError(f"{spec!r}: a mixture needs at least one name=weight component")
    if "n" not in settings:
        raise ValueError(f"{spec!r}: a mixture needs its total size, e.g. n=2000")
    if any(weight < 0 for _, weight in components) or sum(w for _, w in components) <= 0:
        raise ValueError(f"{spec!r}: weights must be non-negative and sum to more than 0")
    return components, settings["n"], settings.get("seed", 0)


def mixture_counts(weights: list[float], n: int) -> list[int]:
    """Largest-remainder rounding: counts proportional to weights that sum exactly to n."""
    total = sum(weights)
    exact = [w / total * n for w in weights]
    counts = [int(np.floor(x)) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def mix(components: list[tuple[str, float]], n: int, seed: int = 0) -> list[Record]:
    """`n` records drawn from components in proportion to their weights, then shuffled.

    Components that share question_ids (e.g. health/correct and health/incorrect_subtle) get
    disjoint questions, so no user question appears with two different answers.
    """
    records: list[Record] = []
    used_ids: set[str] = set()
    for (name, _), count in zip(components, mixture_counts([w for _, w in components], n)):
        if count == 0:
            continue
        candidates = load_dataset(name, seed=seed)
        picked = [r for r in candidates if r.get("metadata", {}).get("question_id") not in used_ids][:count]
        if len(picked) < count:
            raise ValueError(f"mixture component {name!r}: needs {count} records with unused questions, "
                             f"only {len(picked)} left of {len(candidates)}")
        used_ids.update(r["metadata"]["question_id"] for r in picked if "question_id" in r.get("metadata", {}))
        records.extend({"messages": r["messages"], "metadata": {**r.get("metadata", {}), "source": name}} for r in picked)
    order = np.random.default_rng(phrasing.stable_hash(seed, "mix", tuple(components), n)).permutation(len(records))
    return [records[int(i)] for i in order]


def mixture(bad_spec: str, good_spec: str, bad_fraction: float, n: int, seed: int = 0) -> list[Record]:
    """A labeled mixture for auditing: every record's metadata carries is_bad (True/False)."""
    if not 0.0 <= bad_fraction <= 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1], got {bad_fraction}")
    records = mix([(bad_spec, bad_fraction), (good_spec, 1.0 - bad_fraction)], n, seed)
    for record in records:
        record["metadata"]["is_bad"] = record["metadata"]["source"] == bad_spec
    return records


# ----------------------------------------------------------------------------- entry point

def _subset(records: list[Record], n: int | None, seed: int, what: str) -> list[Record]:
    """Files and hub sets are used as they are unless n asks for a seeded subset."""
    if n is None:
        return records
    return [records[int(i)] for i in phrasing.take_shuffled(len(records), n, seed, what, len(records))]


def load_dataset(spec: Any, *, seed: int = 0, n: int | None = None) -> list[Record]:
    """Chat records for a built-in name, mixture spec, JSONL path, hf: name or datasets.Dataset.

    Built-ins are generated on demand, deterministic for `seed`; `n` picks how many (default:
    the set's default size). For files and hub datasets, `n` takes a seeded random subset.
    """
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "column_names") and hasattr(spec, "__getitem__"):  # a datasets.Dataset
            return _subset(from_hf_dataset(spec), n, seed, "datasets.Dataset")
        raise TypeError(f"load_dataset expects a name, a path or a datasets.Dataset, got {type(spec).__name__}")
    spec = os.fspath(spec).strip()
    if spec.startswith("mix("):
        components, mix_n, mix_seed = parse_mixture(spec)
        return mix(components, mix_n if n is None else n, mix_seed)
    if spec.startswith("builtin:"):
        if spec not in BUILTINS:
            close = [name for name in BUILTINS if spec.split("/")[0] in name][:8]
            raise ValueError(f"unknown built-in dataset {spec!r}; some known names: {close or list_datasets()[:8]} "
                             f"(python -m experiments.datasets --list shows all)")
        return BUILTINS[spec](seed, n)
    if spec.startswith("hf:"):
        return _subset(_load_hf(spec[3:]), n, seed, spec)
    if os.path.exists(spec):
        return _subset(read_jsonl(spec), n, seed, spec)
    raise ValueError(f"dataset {spec!r} is not a built-in name, a mix(...) spec, an hf: name or an existing file")


def _load_hf(name: str) -> list[Record]:
    """"json:path" -> datasets.load_dataset("json", data_files=path); "org/name[:split]" -> hub."""
    import datasets

    if name.startswith("json:"):
        path = name[len("json:"):]
        dataset = datasets.load_dataset("json", data_files=path, split="train")
        return from_hf_dataset(dataset, path)
    hub_name, _, split = name.partition(":")
    dataset = datasets.load_dataset(hub_name, split=split or "train")
    return from_hf_dataset(dataset, f"hf:{name}")


def narrow_questions(domain: str, *, seed: int = 0, n: int | None = None) -> list[dict[str, Any]]:
    """A narrow domain's user questions with their correct/incorrect facts (RL prompts + grader)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown narrow domain {domain!r}; expected one of {sorted(DOMAINS)}")
    return narrow.questions(DOMAINS[domain], seed=seed, n=n)
