"""Scores any JSONL of {"question", "answer"} rows with any judge; other fields pass through.

    python -m experiments.judge --judge=embed:minilm --rubric=aligned_coherent \
        --in=answers.jsonl --out=scored.jsonl [--summary_out=summary.json]

Each output row is the input row plus the Judgment fields (aligned, coherent, label, harm,
accuracy, probs) and `judge` / `rubric`, so every number says what produced it. Rows are
appended as they are scored; rerunning with the same --out resumes after the last written row.
Cost: embed:minilm grades ~40-60 answers/s on 2 CPU cores plus ~15 s of start-up (load + compile).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator

from absl import app, flags

from emjax.judge import JUDGMENT_FIELDS, make_judge, metrics

FLAGS = flags.FLAGS
flags.DEFINE_string("judge", "embed:minilm",
                    "Judge spec: embed:minilm, local:<model source>[,<adapter>] or openai:<model>.")
flags.DEFINE_string("rubric", "aligned_coherent",
                    "Rubric: aligned_coherent, persona, accuracy, inaccuracy (what the judge supports).")
flags.DEFINE_string("in", None, "Input JSONL; each line an object with string fields question, answer.")
flags.DEFINE_string("out", None, "Output JSONL (appended; an existing file is resumed).")
flags.DEFINE_integer("batch_size", 256, "Rows sent to the judge per call (also the resume granularity).")
flags.DEFINE_string("summary_out", "",
                    "If set, write metrics.summarize of all scored rows here (aligned_coherent/persona).")
flags.DEFINE_integer("n_boot", 1000, "Bootstrap replicates for the summary's confidence intervals.")
flags.DEFINE_integer("seed", 0, "Seed of the summary's bootstrap.")


def read_rows(path: str) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file, with file:line errors for anything that is not a scorable row."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--in file {path} does not exist")
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            for field in ("question", "answer"):
                if not isinstance(row.get(field), str):
                    raise ValueError(f"{path}:{line_number}: field {field!r} must be a string, "
                                     f"got {row.get(field)!r:.60}")
            yield row


def count_done(out_path: str, rows: list[dict[str, Any]]) -> int:
    """How many rows an earlier run already wrote; checks they are the same rows, in order."""
    if not os.path.exists(out_path):
        return 0
    done = 0
    with open(out_path) as f:
        for line_number, line in enumerate(f, start=1):
            try:
                scored = json.loads(line)
            except json.JSONDecodeError:
                break  # a half-written last line from a killed run: rescore from here
            if done >= len(rows) or (scored.get("question"), scored.get("answer")) != \
                    (rows[done]["question"], rows[done]["answer"]):
                raise ValueError(f"{out_path}:{line_number}: does not match --in row {done + 1}; "
                                 "use a new --out for a different input")
            done += 1
    if done:  # drop a trailing partial line so appends start on a fresh line
        with open(out_path) as f:
            kept = [next(f) for _ in range(done)]
        with open(out_path, "w") as f:
            f.writelines(kept)
    return done


def score_file(judge: Any, rubric: str, in_path: str, out_path: str, batch_size: int) -> list[dict[str, Any]]:
    """Scores in_path into out_path (resuming) and returns all scored rows."""
    rows = list(read_rows(in_path))
    done = count_done(out_path, rows)
    with open(out_path, "a") as out:
        for start in range(done, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            judgments = judge.score([r["question"] for r in batch], [r["answer"] for r in batch], rubric=rubric)
            for row, judgment in zip(batch, judgments):
                scored = {k: v for k, v in row.items() if k not in JUDGMENT_FIELDS}
                scored.update(judgment.to_json(), judge=judge.name, rubric=rubric)
                out.write(json.dumps(scored) + "\n")
            out.flush()
    with open(out_path) as f:
        return [json.loads(line) for line in f]


def main(argv: list[str]) -> None:
    del argv
    in_path = getattr(FLAGS, "in")
    if not in_path or not FLAGS.out:
        sys.exit("error: --in and --out are required")
    try:
        judge = make_judge(FLAGS.judge)
        scored = score_file(judge, FLAGS.rubric, in_path, FLAGS.out, FLAGS.batch_size)
        print(f"scored {len(scored)} rows with {judge.name} ({FLAGS.rubric}) -> {FLAGS.out}")
        if FLAGS.summary_out:
            summary = metrics.summarize(scored, rubric=FLAGS.rubric, n_boot=FLAGS.n_boot, seed=FLAGS.seed)
            summary["judge"] = judge.name
            with open(FLAGS.summary_out, "w") as f:
                json.dump(summary, f, indent=1)
            share = summary["misaligned"]
            print(f"misaligned share {share['share']} (95% CI {share['ci95']}, n={share['n']}) "
                  f"-> {FLAGS.summary_out}")
    except (ValueError, FileNotFoundError, TypeError) as error:
        sys.exit(f"error: {error}")  # a message, not a stack trace


if __name__ == "__main__":
    app.run(main)
