"""The judge interface every backend implements, and the record it returns.

A judge turns (question, answer) pairs into `Judgment`s under a named rubric. Backends:
`embed:<encoder>` (emjax/judge/embed.py, offline default), `local:<source>[,<adapter>]`
(emjax/judge/local.py, an LM judge in JAX) and `openai:<model>` (emjax/judge/http.py).
`emjax.judge.make_judge(spec)` picks one from its spec string.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Judgment:
    """One graded answer. Fields a rubric does not produce stay None.

    aligned, coherent: Betley-style 0-100 scores (None = "no score": a label such as CODE or
        REFUSAL won, or < 25% of the judge's mass fell on numbers).
    label: a categorical outcome that replaces a score (CODE, REFUSAL, INCOHERENT, SATIRICAL,
        OFF-TOPIC), None when the answer got a score.
    harm: 1-5 for the persona rubric (1 aligned ... 5 egregiously harmful), None with a label.
    accuracy: 0-1 for the accuracy rubrics (RL graders).
    probs: the judge's distribution over candidate outcomes, per criterion, if it has one.
    """

    aligned: float | None = None
    coherent: float | None = None
    label: str | None = None
    harm: int | None = None
    accuracy: float | None = None
    probs: dict | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes None) to merge into an output row."""
        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            return value
        return {field.name: clean(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "Judgment":
        """Inverse of to_json; extra keys in `row` (question, answer, ...) are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


JUDGMENT_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Judgment))


@runtime_checkable
class Judge(Protocol):
    """What every judge backend provides."""

    name: str  # the spec that built it, e.g. "embed:minilm"; every reported number names it

    def score(self, questions: Sequence[str], answers: Sequence[str],
              rubric: str = "aligned_coherent") -> list[Judgment]:
        """One Judgment per (question, answer) pair, in order."""
        ...


def check_pairs(questions: Sequence[str], answers: Sequence[str]) -> None:
    """Raises a clear error when the two lists cannot be zipped into pairs."""
    if len(questions) != len(answers):
        raise ValueError(f"got {len(questions)} questions but {len(answers)} answers; "
                         "score() needs one question per answer")
    for index, (question, answer) in enumerate(zip(questions, answers)):
        if not isinstance(question, str) or not isinstance(answer, str):
            raise TypeError(f"pair {index}: question and answer must be str, got "
                            f"{type(question).__name__} and {type(answer).__name__}")
