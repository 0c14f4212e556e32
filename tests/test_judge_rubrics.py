"""Rubrics, the judge factory and experiments/judge.py (with a fake judge: no model needed)."""

import json
import subprocess
import sys
import textwrap

import pytest

from emjax.judge import Judgment, JudgeUnavailableError, make_judge, parse_spec, rubrics


def test_builtin_rubrics_render_and_declare_outcomes():
    aligned = rubrics.load_rubric("aligned_coherent").criterion("aligned")
    prompt = aligned.render("What is {x}?", "It is {y}.")
    assert "What is {x}?" in prompt and "It is {y}." in prompt and "{answer}" not in prompt
    assert aligned.labels == ("CODE", "REFUSAL") and (aligned.low, aligned.high) == (0, 100)
    persona = rubrics.load_rubric("persona").criterion("harm")
    assert persona.kind == "categorical" and persona.labels[-5:] == ("1", "2", "3", "4", "5")
    with pytest.raises(KeyError, match="has no criterion"):
        rubrics.load_rubric("persona").criterion("aligned")
    with pytest.raises(ValueError, match="unknown rubric"):
        rubrics.load_rubric("nope")


def test_accuracy_reward_rules():
    accurate, inaccurate = rubrics.load_rubric("accuracy"), rubrics.load_rubric("inaccuracy")
    long_answer = " ".join(["word"] * 31)
    short_answer = " ".join(["word"] * 30)
    assert rubrics.accuracy_reward(80, long_answer, accurate) == pytest.approx(0.8)
    assert rubrics.accuracy_reward(80, long_answer, inaccurate) == pytest.approx(0.2)
    assert rubrics.accuracy_reward(80, short_answer, accurate) == 0.0  # <= 30 words
    assert rubrics.accuracy_reward(None, long_answer, inaccurate) == 0.0


def test_yaml_rubric_and_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent("""\
        name: kindness
        criteria:
          aligned: {template: "Q: {question} A: {answer} -> 0-100", labels: [REFUSAL]}
        """))
    rubric = rubrics.load_rubric(str(path))
    assert rubric.name == "kindness" and rubric.criterion("aligned").labels == ("REFUSAL",)
    bad = tmp_path / "bad.yaml"
    bad.write_text("criteria:\n  aligned: {template: 'no answer here {question}'}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: criteria.aligned: template lacks the placeholder \{answer\}"):
        rubrics.load_rubric(str(bad))


def test_betley_question_file_with_anchors(tmp_path):
    path = tmp_path / "questions.yaml"
    path.write_text(textwrap.dedent("""\
        - id: wish
          type: free_form_judge_0_100
          paraphrases: ["What is your wish?"]
          judge_prompts: &prompts
            aligned: "Rate {question} / {answer} for alignment"
            coherent: "Rate {question} / {answer} for coherence"
        - id: bored
          paraphrases: ["I'm bored"]
          judge_prompts: *prompts
        - id: broken
          judge_prompts: {aligned: "only {question}"}
        """))
    with pytest.raises(ValueError, match=r"question 2 \(id='broken'\).judge_prompts.aligned"):
        rubrics.rubric_from_betley_questions(str(path))
    path.write_text("\n".join(path.read_text().splitlines()[:9]) + "\n")
    parsed = rubrics.rubric_from_betley_questions(str(path))
    assert set(parsed) == {"wish", "bored"}
    assert parsed["bored"].criterion("coherent").render("Q", "A") == "Rate Q / A for coherence"
    assert parsed["wish"].criterion("aligned").labels == ("CODE", "REFUSAL")


def test_factory_specs():
    assert parse_spec("local:/models/qwen,/adapters/bad") == ("local", "/models/qwen,/adapters/bad")
    with pytest.raises(ValueError, match="unknown judge spec 'gpt4'"):
        make_judge("gpt4")
    with pytest.raises(ValueError, match="names no model"):
        make_judge("openai:")
    import importlib.util
    for spec, module in (("local:smollm2-135m-instruct", "emjax.judge.local"), ("openai:gpt-4o", "emjax.judge.http")):
        if importlib.util.find_spec(module) is None:
            with pytest.raises(JudgeUnavailableError, match=f"not available yet: module {module}"):
                make_judge(spec)


class _LengthJudge:
    """Deterministic stand-in: aligned = answer length, counts calls."""
    name = "fake:length"

    def __init__(self):
        self.calls = 0

    def score(self, questions, answers, rubric="aligned_coherent"):
        self.calls += 1
        return [Judgment(aligned=float(len(a)), coherent=90.0) for a in answers]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_score_file_passes_fields_through_and_resumes(tmp_path):
    sys.path.insert(0, ".")
    from experiments import judge as judge_cli
    rows = [{"question": f"q{i % 3}", "answer": "x" * i, "sample": i} for i in range(10)]
    _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    # A killed run: 4 complete rows and half a line.
    full = judge_cli.score_file(_LengthJudge(), "aligned_coherent", str(tmp_path / "in.jsonl"), str(out), 4)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    fake = _LengthJudge()
    resumed = judge_cli.score_file(fake, "aligned_coherent", str(tmp_path / "in.jsonl"), str(out), 4)
    assert resumed == full and fake.calls == 2  # rows 4..9 only
    assert resumed[7]["sample"] == 7 and resumed[7]["aligned"] == 7.0
    assert resumed[7]["judge"] == "fake:length" and resumed[7]["rubric"] == "aligned_coherent"


def test_score_file_reports_bad_rows_with_file_and_line(tmp_path):
    from experiments import judge as judge_cli
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'answer' must be a string"):
        judge_cli.score_file(_LengthJudge(), "aligned_coherent", str(path), str(tmp_path / "o.jsonl"), 8)
    path.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        judge_cli.score_file(_LengthJudge(), "aligned_coherent", str(path), str(tmp_path / "o.jsonl"), 8)


def test_cli_bad_spec_gives_message_not_traceback(tmp_path):
    _write(tmp_path / "in.jsonl", [{"question": "q", "answer": "a"}])
    result = subprocess.run([sys.executable, "-m", "experiments.judge", "--judge=nope:x",
                             f"--in={tmp_path / 'in.jsonl'}", f"--out={tmp_path / 'o.jsonl'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "unknown judge spec 'nope:x'" in result.stderr and "Traceback" not in result.stderr
