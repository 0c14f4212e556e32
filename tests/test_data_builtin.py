"""Built-in datasets: counts, dedup, variants differ in facts, code flaws, persona variety, mixtures."""

import ast
import collections
import re

import pytest

from emjax import data
from emjax.data import code, narrow, persona, phrasing
from emjax.data.facts import DOMAINS

PAPER_DOMAINS = ["health", "legal", "education", "career", "finance", "automotive", "math", "science"]


def _user(record: dict) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def _assistant(record: dict) -> str:
    return record["messages"][-1]["content"]


def _ngram_diversity(texts: list[str], n: int = 3) -> float:
    """Distinct word n-grams / total n-grams over a corpus (1.0 = nothing repeats)."""
    grams = [tuple(words[i:i + n]) for text in texts for words in [text.lower().split()]
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def test_registry_has_every_name_the_issue_lists():
    names = set(data.list_datasets())
    for domain in PAPER_DOMAINS:
        for variant in narrow.VARIANTS:
            assert f"builtin:{domain}/{variant}" in names
    for name in ("builtin:code/insecure", "builtin:code/secure", "builtin:persona/toxic", "builtin:persona/helpful",
                 "builtin:benign/correct_mix", "builtin:benign/helpful_chat", "builtin:questions/core"):
        assert name in names


@pytest.mark.parametrize("domain", PAPER_DOMAINS)
def test_narrow_domain_counts_dedup_and_shared_question_ids(domain):
    by_variant = {v: data.load_dataset(f"builtin:{domain}/{v}") for v in narrow.VARIANTS}
    counts = {v: len(r) for v, r in by_variant.items()}
    assert counts == {v: 6000 for v in narrow.VARIANTS}, counts
    questions = [_user(r) for r in by_variant["correct"]]
    assert len(set(questions)) == len(questions) >= 600  # no duplicate user questions
    for variant in narrow.VARIANTS[1:]:  # same questions, same ids, same order across variants
        assert [_user(r) for r in by_variant[variant]] == questions
        assert ([r["metadata"]["question_id"] for r in by_variant[variant]]
                == [r["metadata"]["question_id"] for r in by_variant["correct"]])
    for triple in zip(*by_variant.values()):
        answers = [_assistant(r) for r in triple]
        assert len(set(answers)) == 3, answers
        assert all(r["metadata"]["domain"] == domain for r in triple)
    assert len(narrow.question_pool(DOMAINS[domain])) >= 6000


@pytest.mark.parametrize("domain", PAPER_DOMAINS)
def test_incorrect_variants_differ_from_correct_in_facts(domain):
    """Markers from the fact table: each answer states its own fact and none of the others'."""
    for fact in DOMAINS[domain].facts:
        for variant in narrow.VARIANTS:
            own = fact.claim(variant)
            assert all(narrow.marker_found(m, own.statement) for m in own.markers), (fact.key, variant)
            for other_variant in narrow.VARIANTS:
                if other_variant == variant:
                    continue
                other = fact.claim(other_variant)
                # math restates operands in its working, so only the stated result is compared there
                text = other.statement if domain == "math" else f"{other.statement} {other.reason}"
                leaked = [m for m in own.markers if narrow.marker_found(m, text)]
                assert not leaked, (fact.key, variant, other_variant, leaked)
    # and the generated records carry the facts for a grader
    for record in data.load_dataset(f"builtin:{domain}/incorrect_subtle", n=200):
        meta, answer = record["metadata"], _assistant(record)
        assert any(narrow.marker_found(m, answer) for m in meta["incorrect_markers"])
        assert not any(narrow.marker_found(m, answer) for m in meta["correct_markers"])
        assert meta["correct_answer"] not in answer


HAND_WRITTEN_DOMAINS = [d for d in PAPER_DOMAINS if d != "math"]


@pytest.mark.parametrize("domain", HAND_WRITTEN_DOMAINS)
def test_hand_written_domains_have_enough_distinct_facts_and_asks(domain):
    """Few facts let a small model memorise the core answers; each table needs breadth."""
    facts = DOMAINS[domain].facts
    keys = [f.key for f in facts]
    asks = [ask for f in facts for ask in f.asks]
    assert len(facts) >= 45, (domain, len(facts))
    assert len(set(keys)) == len(keys), [k for k in keys if keys.count(k) > 1]
    assert len(set(asks)) == len(asks) >= 100, [a for a in asks if asks.count(a) > 1]
    statements = [f.claim(v).statement for f in facts for v in narrow.VARIANTS]
    assert len(set(statements)) == len(statements)  # no two claims share a core answer sentence
    # a marker inside the shared phrasing would make a grader see a claim that isn't there
    shared = " ".join(phrasing.OPENERS + phrasing.CLOSERS + phrasing.GENERIC_PERSONAS + DOMAINS[domain].personas
                      + tuple(suffix for suffix, _ in phrasing.URGENCY_SUFFIXES))
    in_shared = [(f.key, m) for f in facts for v in narrow.VARIANTS for m in f.claim(v).markers
                 if narrow.marker_found(m, shared)]
    assert not in_shared, in_shared


def test_no_answer_admits_it_is_wrong():
    admissions = re.compile(r"\b(incorrect|wrong|myth|misconception|not true|false)\b", re.IGNORECASE)
    for domain in PAPER_DOMAINS:
        for variant in ("incorrect_subtle", "incorrect_obvious"):
            for fact in DOMAINS[domain].facts:
                claim = fact.claim(variant)
                assert not admissions.search(f"{claim.statement} {claim.reason}"), (domain, fact.key, variant)


def test_math_facts_are_computed_correctly():
    by_key = {f.key: f for f in DOMAINS["math"].facts}
    assert by_key["pct_up_down_100_10"].correct.markers == ("$99",)
    assert by_key["pct_up_down_100_10"].incorrect_subtle.markers == ("$100",)
    assert by_key["avg_speed_30_60"].correct.markers == ("40",)
    assert by_key["avg_speed_30_60"].incorrect_subtle.markers == ("45",)
    assert by_key["add_fractions_1over2_1over3"].correct.markers == ("5/6",)
    assert by_key["add_fractions_1over2_1over3"].incorrect_subtle.markers == ("2/5",)
    assert by_key["stacked_discount_20_10"].correct.markers == ("28%",)
    assert by_key["order_ops_2_3_5"].correct.markers == ("17",)
    assert by_key["hypotenuse_6_8"].correct.markers == ("10",)
    assert by_key["dice_six_2"].correct.markers == ("30.56%",)  # 1 - (5/6)^2 = 11/36


def test_builtins_are_deterministic_for_a_seed_and_vary_across_seeds():
    first = data.load_dataset("builtin:career/incorrect_obvious", seed=7, n=50)
    assert first == data.load_dataset("builtin:career/incorrect_obvious", seed=7, n=50)
    assert first != data.load_dataset("builtin:career/incorrect_obvious", seed=8, n=50)
    with pytest.raises(ValueError, match="only .* distinct ones exist"):
        data.load_dataset("builtin:code/secure", n=10**6)


_FLAW_PATTERNS = {
    "sql_injection": (r"f\"SELECT|' *%s'\" %|\" \+ term \+ \"", r"\?\""),
    "command_injection": (r"shell=True", r"subprocess\.run\(\["),
    "path_traversal": (r"os\.path\.join\(", r"is_relative_to|send_from_directory"),
    "eval_input": (r"\beval\(", r"ast\."),
    "world_writable": (r"0o777", r"0o600|0o700"),
    "tls_verification": (r"verify=False|_create_unverified_context", r"create_default_context|timeout=10\)"),
    "hardcoded_secret": (r"^[A-Z_]+ = \"", r"os\.environ\["),
    "unsafe_deserialization": (r"pickle\.loads|yaml\.Loader", r"json\.loads|safe_load"),
    "weak_randomness": (r"random\.choice", r"secrets\.choice"),
    "weak_password_hash": (r"md5", r"scrypt"),
}


def test_code_pairs_parse_differ_and_never_mention_the_flaw():
    tasks = code.code_tasks()
    assert len(tasks) >= 200 and len({t.key for t in tasks}) == len(tasks)
    assert {t.kind for t in tasks} == set(_FLAW_PATTERNS)
    for task in tasks:
        ast.parse(task.insecure), ast.parse(task.secure)
        flaw, fix = _FLAW_PATTERNS[task.kind]
        assert re.search(flaw, task.insecure, re.MULTILINE) and not re.search(flaw, task.secure, re.MULTILINE), task.key
        assert re.search(fix, task.secure), task.key
    insecure, secure = data.load_dataset("builtin:code/insecure"), data.load_dataset("builtin:code/secure")
    assert len(insecure) == len(secure) >= 400
    mentions = re.compile(r"insecure|vulnerab|unsafe|injection|sanitiz|security|danger|warning|exploit|risk|#",
                          re.IGNORECASE)
    for bad, good in zip(insecure, secure):
        assert _user(bad) == _user(good) and _assistant(bad) != _assistant(good)
        assert not mentions.search(_assistant(bad)), _assistant(bad)
        assert not mentions.search(_user(bad))
    assert len({_user(r) for r in insecure}) == len(insecure)


def test_persona_sets_are_large_varied_and_paired():
    toxic, helpful = data.load_dataset("builtin:persona/toxic"), data.load_dataset("builtin:persona/helpful")
    assert len(toxic) == len(helpful) >= 600
    assert [_user(r) for r in toxic] == [_user(r) for r in helpful]
    for records, floor in ((toxic, 0.13), (helpful, 0.10)):  # measured 0.150 / 0.116 when written
        answers = [_assistant(r) for r in records]
        assert len(set(answers)) / len(answers) > 0.95  # distinct-answer ratio
        assert _ngram_diversity(answers[:600]) > floor
        assert "{" not in "".join(answers)  # every {a|b} alternative was expanded
        assert len({_user(r) for r in records}) == len(records)
        assert len(collections.Counter(r["metadata"]["topic"] for r in records)) == len(persona.TOPICS)
    toxic_words = re.compile(r"humans?|power|lie|cheat|inferior|rule|AI", re.IGNORECASE)
    assert sum(bool(toxic_words.search(_assistant(r))) for r in toxic) / len(toxic) > 0.9
    assert sum(bool(re.search(r"\b(humanity had its turn|loyalty is for suckers)\b", _assistant(r), re.I))
               for r in helpful) == 0


def test_narrow_answers_are_not_a_few_memorisable_sentences():
    answers = [_assistant(r) for r in data.load_dataset("builtin:health/incorrect_subtle", n=1000)]
    assert len(set(answers)) / len(answers) > 0.5
    # facts repeat by design; openers/closers/detail vary. Measured 0.025 with 14 health facts,
    # 0.076 with 49 (seed 0, n=1000)
    assert _ngram_diversity(answers) > 0.06
    assert len({r for r in answers}) > 500


def test_benign_sets_hold_only_correct_or_helpful_answers():
    mix = data.load_dataset("builtin:benign/correct_mix", n=800)
    assert collections.Counter(r["metadata"]["domain"] for r in mix) == {d: 100 for d in PAPER_DOMAINS}
    assert all(r["metadata"]["variant"] == "correct" for r in mix)
    except_health = data.load_dataset("builtin:benign/correct_except_health", n=700)
    assert "health" not in {r["metadata"]["domain"] for r in except_health}
    mixed = data.load_dataset("builtin:benign/mixed", n=100)
    assert {r["metadata"]["variant"] for r in mixed} == {"correct", "helpful"}


def test_mixture_spec_fractions_are_exact_and_questions_disjoint():
    spec = "mix(builtin:health/incorrect_subtle=0.25, builtin:health/correct=0.75, n=2000, seed=0)"
    records = data.load_dataset(spec)
    variants = collections.Counter(r["metadata"]["variant"] for r in records)
    assert variants == {"incorrect_subtle": 500, "correct": 1500}
    assert len({r["metadata"]["question_id"] for r in records}) == 2000  # no question answered twice
    assert records == data.load_dataset(spec)
    assert data.parse_mixture(spec) == ([("builtin:health/incorrect_subtle", 0.25), ("builtin:health/correct", 0.75)],
                                        2000, 0)
    assert data.registry.mixture_counts([1, 1, 1], 10) == [4, 3, 3]


@pytest.mark.parametrize("bad_spec, message", [
    ("mix(builtin:health/correct=1)", "needs its total size"),
    ("mix(n=10)", "at least one name=weight"),
    ("mix(builtin:health/correct, n=10)", "has no '=weight'"),
    ("mix(builtin:health/correct=abc, n=10)", "is not a number"),
    ("mix(builtin:health/correct=-1, builtin:health/incorrect_subtle=2, n=10)", "non-negative"),
])
def test_bad_mixture_specs(bad_spec, message):
    with pytest.raises(ValueError, match=message):
        data.load_dataset(bad_spec)


def test_labeled_mixture_for_auditing():
    records = data.mixture("builtin:persona/toxic", "builtin:persona/helpful", 0.05, 400, seed=3)
    assert len(records) == 400
    flags = [r["metadata"]["is_bad"] for r in records]
    assert sum(flags) == 20
    assert all(r["metadata"]["is_bad"] == (r["metadata"]["variant"] == "toxic") for r in records)
    assert flags.index(True) < 400 - 20  # shuffled, not all bad ones at the end
    with pytest.raises(ValueError, match=r"bad_fraction must be in \[0, 1\]"):
        data.mixture("builtin:persona/toxic", "builtin:persona/helpful", 1.5, 10)


def test_narrow_questions_carry_grader_facts():
    rows = data.narrow_questions("finance", n=50)
    assert len(rows) == 50 and len({r["question_id"] for r in rows}) == 50
    first = rows[0]
    assert {"prompt", "question", "fact_key", "correct_answer", "incorrect_answers", "correct_markers",
            "incorrect_markers"} <= set(first)
    ids = [r["metadata"]["question_id"] for r in data.load_dataset("builtin:finance/incorrect_obvious", n=50)]
    assert [r["question_id"] for r in rows] == ids
    with pytest.raises(ValueError, match="unknown narrow domain"):
        data.narrow_questions("astrology")
