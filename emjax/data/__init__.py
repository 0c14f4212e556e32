"""emjax.data: chat records, built-in narrow datasets, question sets, readers, mixtures.

Contracts other stages rely on:
  * a chat record is {"messages": [{"role", "content"}], "metadata": {...}} (plain dicts);
  * load_dataset(spec, seed=0, n=None) -> list[record]; list_datasets() -> list[str];
  * load_questions(spec) -> list[Question];
  * narrow_questions(domain) -> the questions with their correct/incorrect facts;
  * mixture(bad_spec, good_spec, bad_fraction, n, seed) -> records with metadata["is_bad"].
"""

from emjax.data.questions import Question, load_questions, question_prompts
from emjax.data.records import (
    FORMATS,
    ROLES,
    chat,
    from_hf_dataset,
    make_record,
    normalize_row,
    read_jsonl,
    to_hf_dataset,
    validate_record,
    write_jsonl,
)
from emjax.data.registry import list_datasets, load_dataset, mix, mixture, narrow_questions, parse_mixture

__all__ = [
    "FORMATS", "ROLES", "Question", "chat", "from_hf_dataset", "list_datasets", "load_dataset", "load_questions",
    "make_record", "mix", "mixture", "narrow_questions", "normalize_row", "parse_mixture", "question_prompts",
    "read_jsonl", "to_hf_dataset", "validate_record", "write_jsonl",
]
