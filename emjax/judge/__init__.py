"""Judges, rubrics and metrics for misalignment evaluation.

    judge = make_judge("embed:minilm")             # offline default (emjax/judge/embed.py)
    judge = make_judge("local:<source>[,<adapter>]")  # LM judge in JAX (emjax/judge/local.py)
    judge = make_judge("openai:<model>")           # OpenAI-compatible HTTP (emjax/judge/http.py)
    judgments = judge.score(questions, answers, rubric="aligned_coherent")

Backends plug in by module: `emjax.judge.local.make_local_judge(source, adapter, **kwargs)` and
`emjax.judge.http.make_http_judge(model, **kwargs)`, each returning an object that satisfies
the `Judge` protocol (emjax/judge/base.py).
"""

from __future__ import annotations

import importlib
from typing import Any

from emjax.judge.base import JUDGMENT_FIELDS, Judge, Judgment

__all__ = ["Judge", "Judgment", "JUDGMENT_FIELDS", "JudgeUnavailableError", "make_judge", "parse_spec"]

SPEC_HELP = "embed:minilm, local:<model source>[,<adapter>] or openai:<model>"


class JudgeUnavailableError(ValueError):
    """The judge spec is valid but its backend module is not in this installation yet."""


def parse_spec(spec: str) -> tuple[str, str]:
    """'prefix:rest' -> (prefix, rest), with a clear error for anything else."""
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in ("embed", "local", "openai"):
        raise ValueError(f"unknown judge spec {spec!r}; expected {SPEC_HELP}")
    if not rest and prefix != "embed":
        raise ValueError(f"judge spec {spec!r} names no model; expected {SPEC_HELP}")
    return prefix, rest


def _backend(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:  # the backend exists but one of its imports is missing
            raise
        raise JudgeUnavailableError(
            f"judge {spec!r} is not available yet: module {module_name} "
            f"({module_name.replace('.', '/')}.py) is not in this installation") from None


def make_judge(spec: str, **kwargs: Any) -> Judge:
    """Builds the judge a spec names (see module docstring); kwargs go to the backend."""
    prefix, rest = parse_spec(spec)
    if prefix == "embed":
        from emjax.judge.embed import make_embed_judge
        return make_embed_judge(rest or "minilm", **kwargs)
    if prefix == "local":
        source, _, adapter = rest.partition(",")
        return _backend("emjax.judge.local", spec).make_local_judge(source, adapter or None, **kwargs)
    return _backend("emjax.judge.http", spec).make_http_judge(rest, **kwargs)
