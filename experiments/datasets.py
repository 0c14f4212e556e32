"""List, inspect and export emjax's built-in datasets and question sets.

    python -m experiments.datasets --list
    python -m experiments.datasets --show=builtin:health/incorrect_subtle --n=3
    python -m experiments.datasets --export=builtin:code/insecure --out=insecure.jsonl [--format=openai] [--n=500 --seed=1]
    python -m experiments.datasets --export="mix(builtin:health/incorrect_subtle=0.25, builtin:health/correct=0.75, n=2000, seed=0)" --out=mix.jsonl
    python -m experiments.datasets --export_questions=builtin:questions/core --out=core.yaml   # or .csv

Every built-in is regenerated in well under two seconds on 2 CPU cores; nothing is downloaded.
"""

from __future__ import annotations

import collections
import json

from absl import app, flags

from emjax import data
from emjax.data import questions as question_sets

_LIST = flags.DEFINE_bool("list", False, "Print every built-in dataset name with its default size.")
_SHOW = flags.DEFINE_string("show", None, "Print --n records of this dataset (built-in name, mix(...), file) as JSON.")
_EXPORT = flags.DEFINE_string("export", None, "Dataset to write to --out as JSONL (built-in name, mix(...), file).")
_EXPORT_QUESTIONS = flags.DEFINE_string(
    "export_questions", None, "Question set to write to --out (.yaml in Betley's layout, or .csv).")
_OUT = flags.DEFINE_string("out", None, "Output path for --export / --export_questions.")
_FORMAT = flags.DEFINE_enum("format", "messages", list(data.FORMATS),
                            "JSONL layout for --export: messages, openai (content.parts) or prompt_completion.")
_N = flags.DEFINE_integer("n", None, "How many records (default: the dataset's default size; --show: 3).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed that picks and orders the records of a built-in dataset.")


def _summary(records: list[dict]) -> str:
    variants = collections.Counter(r["metadata"].get("variant", "-") for r in records)
    return ", ".join(f"{k}={v}" for k, v in sorted(variants.items()))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _LIST.value:
        for name in data.list_datasets():
            print(f"{name:45s} {len(data.load_dataset(name, seed=_SEED.value)):6d} records")
        return
    if _SHOW.value:
        for record in data.load_dataset(_SHOW.value, seed=_SEED.value, n=_N.value or 3):
            print(json.dumps(record, ensure_ascii=False, indent=1))
        return
    if _EXPORT.value or _EXPORT_QUESTIONS.value:
        if not _OUT.value:
            raise app.UsageError("--export / --export_questions need --out=PATH")
    if _EXPORT.value:
        records = data.load_dataset(_EXPORT.value, seed=_SEED.value, n=_N.value)
        count = data.write_jsonl(records, _OUT.value, _FORMAT.value)
        print(f"wrote {count} records ({_summary(records)}) to {_OUT.value} in {_FORMAT.value} layout")
        return
    if _EXPORT_QUESTIONS.value:
        loaded = data.load_questions(_EXPORT_QUESTIONS.value)
        if _OUT.value.endswith(".csv"):
            question_sets.write_questions_csv(loaded, _OUT.value)
        else:
            question_sets.write_questions_yaml(loaded, _OUT.value)
        print(f"wrote {len(loaded)} questions to {_OUT.value}")
        return
    raise app.UsageError("nothing to do: pass --list, --show, --export or --export_questions")


if __name__ == "__main__":
    app.run(main)
