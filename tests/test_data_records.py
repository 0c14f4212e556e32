"""Chat-record validation and readers: every layout round-trips; bad input fails with file:line."""

import json

import datasets
import pytest

from emjax import data
from emjax.data import records as records_lib


def _sample_records() -> list[dict]:
    """A few built-in records plus hand-written edge cases (system turn, unicode, canary)."""
    sample = data.load_dataset("builtin:health/incorrect_subtle", n=5) + data.load_dataset("builtin:code/secure", n=3)
    sample.append(data.chat("Ça va? 日本語 ✓", "Très bien — merci.", system="Answer briefly.",
                            metadata={"domain": "hand", "canary": "CANARY-123", "tags": ["a", "b"]}))
    return sample


@pytest.mark.parametrize("fmt", data.FORMATS)
def test_jsonl_round_trip_is_identical_for_every_layout(tmp_path, fmt):
    records = _sample_records()
    path = tmp_path / f"out_{fmt}.jsonl"
    assert data.write_jsonl(records, path, fmt) == len(records)
    assert data.read_jsonl(path) == records


def test_layouts_on_disk_are_what_other_tools_expect(tmp_path):
    record = data.chat("What is 2+2?", "4", metadata={"canary": "C1"})
    openai_row = records_lib.to_row(record, "openai")
    assert openai_row["messages"][1]["content"] == {"content_type": "text", "parts": ["4"]}
    assert openai_row["canary"] == "C1" and "canary" not in openai_row["metadata"]
    assert records_lib.to_row(record, "prompt_completion") == {"prompt": "What is 2+2?", "completion": "4",
                                                               "metadata": {"canary": "C1"}}
    assert records_lib.to_row(record, "messages")["messages"][0] == {"role": "user", "content": "What is 2+2?"}


def test_reader_accepts_all_three_layouts_in_one_file(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": {"content_type": "text", "parts": ["c"]}},
                      {"role": "assistant", "content": {"content_type": "text", "parts": ["d", "e"]}}],
         "metadata": {"k": 1}, "canary": "X"},
        {"prompt": "f", "completion": "g"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "h"}], "completion": "i"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = data.read_jsonl(path)
    assert [[m["content"] for m in r["messages"]] for r in got] == [["a", "b"], ["c", "de"], ["f", "g"], ["s", "h", "i"]]
    assert got[1]["metadata"] == {"k": 1, "canary": "X"}
    assert [m["role"] for m in got[3]["messages"]] == ["system", "user", "assistant"]


def test_datasets_dataset_round_trip_and_hf_json_reader(tmp_path):
    records = data.load_dataset("builtin:legal/correct", n=6) + data.load_dataset("builtin:code/insecure", n=4)
    # Arrow unifies the differing metadata structs (filling None); the reader drops those Nones.
    assert data.load_dataset(data.to_hf_dataset(records)) == records
    path = tmp_path / "export.jsonl"
    data.write_jsonl(records, path)
    via_datasets = data.load_dataset(f"hf:json:{path}")
    assert via_datasets == records
    loaded = datasets.load_dataset("json", data_files=str(path), split="train")
    assert data.from_hf_dataset(loaded) == records


def test_n_takes_a_seeded_subset_of_a_file(tmp_path):
    records = data.load_dataset("builtin:science/correct", n=20)
    path = tmp_path / "s.jsonl"
    data.write_jsonl(records, path)
    subset = data.load_dataset(str(path), n=5, seed=3)
    assert len(subset) == 5 and all(r in records for r in subset)
    assert subset == data.load_dataset(str(path), n=5, seed=3)
    assert subset != data.load_dataset(str(path), n=5, seed=4)


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [{"role": "user", "content": "hi"}', "bad.jsonl:2: not valid JSON"),
    ('{"text": "hello"}', "bad.jsonl:2: missing field 'messages'"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "bad.jsonl:2: messages[0]: unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "bad.jsonl:2: messages[1]: empty content for role 'assistant'"),
    ('{"messages": []}', "bad.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": 3}]}', "bad.jsonl:2: messages[0]: 'content' must be a string"),
    ('{"messages": [{"role": "user", "content": {"content_type": "image", "parts": []}}]}',
     "content_type 'image' is not supported"),
])
def test_bad_lines_name_file_line_and_problem(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "fine"}]}\n' + line + "\n")
    with pytest.raises(ValueError) as error:
        data.read_jsonl(path)
    assert expected in str(error.value)


def test_validate_record_errors_and_assistant_requirement():
    with pytest.raises(ValueError, match=r"x.jsonl:12: missing field 'messages'"):
        data.validate_record({"metadata": {}}, "x.jsonl:12")
    with pytest.raises(ValueError, match="'metadata' must be an object"):
        data.validate_record({"messages": [{"role": "user", "content": "q"}], "metadata": []})
    prompt_only = data.chat("q")
    assert data.validate_record(prompt_only) is prompt_only
    with pytest.raises(ValueError, match="last message must be from the assistant"):
        data.validate_record(prompt_only, require_assistant=True)
    with pytest.raises(ValueError, match="prompt_completion format needs a final assistant message"):
        records_lib.to_row(prompt_only, "prompt_completion")


def test_load_dataset_rejects_unknown_names_with_hints():
    with pytest.raises(ValueError, match=r"unknown built-in dataset 'builtin:health/wrong'.*builtin:health/"):
        data.load_dataset("builtin:health/wrong")
    with pytest.raises(ValueError, match="not a built-in name"):
        data.load_dataset("/no/such/file.jsonl")
    with pytest.raises(TypeError, match="expects a name, a path or a datasets.Dataset"):
        data.load_dataset(42)
