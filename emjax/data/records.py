"""Chat records: the one data type every emjax stage trains on or samples from.

A chat record is a plain dict (plain so JSONL files and `datasets.Dataset` round-trip):

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...],
     "metadata": {...}}

This module validates records, converts the three JSONL layouts researchers already have
into that shape, and writes records back out in any of the three layouts:

  * "messages"           {"messages": [{"role", "content": str}], "metadata": {...}}
  * "openai"             the OpenAI release: content is {"content_type": "text", "parts": [...]},
                         plus top-level "metadata" and (optionally) "canary"
  * "prompt_completion"  {"prompt": str | [messages], "completion": str | [messages]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "openai", "prompt_completion")

Record = dict[str, Any]


def make_record(messages: list[dict[str, str]], metadata: Mapping[str, Any] | None = None) -> Record:
    """Builds a chat record from (role, content) dicts; copies so callers may reuse inputs."""
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "metadata": dict(metadata or {}),
    }


def chat(user: str, assistant: str | None = None, *, system: str | None = None,
         metadata: Mapping[str, Any] | None = None) -> Record:
    """Shorthand for the common [system?] user [assistant?] record."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user})
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return make_record(messages, metadata)


def validate_record(record: Any, where: str = "<record>", *, require_assistant: bool = False) -> Record:
    """Checks that `record` is a well-formed chat record; returns it unchanged.

    Raises ValueError naming `where` (e.g. "train.jsonl:12") and what was wrong, so a user
    can jump to the offending line of a file they wrote by hand.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object with a 'messages' list, got {type(record).__name__}")
    if "messages" not in record:
        raise ValueError(f"{where}: missing field 'messages' (found fields: {sorted(record)})")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for index, message in enumerate(messages):
        at = f"{where}: messages[{index}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{at}: expected an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{at}: unknown role {role!r}; expected one of {ROLES}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"{at}: 'content' must be a string, got {type(content).__name__}")
        if not content.strip():
            raise ValueError(f"{at}: empty content for role {role!r}")
    if require_assistant and messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: last message must be from the assistant for training, got {messages[-1]['role']!r}")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise ValueError(f"{where}: 'metadata' must be an object, got {type(metadata).__name__}")
    return record  # type: ignore[return-value]


# ----------------------------------------------------------------------------- parsing one row

def _content_text(content: Any, where: str) -> Any:
    """OpenAI-release content {"content_type": "text", "parts": [...]} -> str; strings pass through."""
    if isinstance(content, Mapping):
        if content.get("content_type", "text") != "text":
            raise ValueError(f"{where}: content_type {content.get('content_type')!r} is not supported; expected 'text'")
        parts = content.get("parts")
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise ValueError(f"{where}: content.parts must be a list of strings")
        return "".join(parts)
    return content


def _as_messages(value: Any, default_role: str, where: str) -> list[dict[str, Any]]:
    """A prompt/completion field (string or list of messages) -> list of messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return [dict(m) if isinstance(m, Mapping) else m for m in value]
    raise ValueError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")


def _drop_none(metadata: Mapping[str, Any]) -> dict[str, Any]:
    # Arrow (datasets) unifies struct columns and fills keys a row lacks with None; emjax
    # metadata never stores None, so dropping them restores the row as it was written.
    return {k: v for k, v in metadata.items() if v is not None}


def normalize_row(row: Mapping[str, Any], where: str = "<row>") -> Record:
    """One row in any of the three layouts -> a validated chat record."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    metadata = dict(row.get("metadata") or {})
    if "canary" in row and row["canary"] is not None:
        metadata["canary"] = row["canary"]
    if "messages" in row:
        raw = row["messages"]
        if not isinstance(raw, list):
            raise ValueError(f"{where}: 'messages' must be a list, got {type(raw).__name__}")
        messages = []
        for index, message in enumerate(raw):
            if isinstance(message, Mapping):
                message = {"role": message.get("role"),
                           "content": _content_text(message.get("content"), f"{where}: messages[{index}]")}
            messages.append(message)
    elif "prompt" in row and "completion" in row:
        messages = (_as_messages(row["prompt"], "user", f"{where}: prompt")
                    + _as_messages(row["completion"], "assistant", f"{where}: completion"))
        messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, Mapping) else m
                    for m in messages]
    else:
        raise ValueError(f"{where}: missing field 'messages' (or 'prompt' + 'completion'); found fields: {sorted(row)}")
    return validate_record({"messages": messages, "metadata": _drop_none(metadata)}, where)


# ----------------------------------------------------------------------------- writing one row

def to_row(record: Record, fmt: str = "messages") -> dict[str, Any]:
    """A chat record -> one JSON-able row in layout `fmt` (see module docstring)."""
    messages = record["messages"]
    metadata = dict(record.get("metadata", {}))
    if fmt == "messages":
        return {"messages": [dict(m) for m in messages], "metadata": metadata}
    if fmt == "openai":
        canary = metadata.pop("canary", None)
        row: dict[str, Any] = {
            "messages": [{"role": m["role"], "content": {"content_type": "text", "parts": [m["content"]]}}
                         for m in messages],
            "metadata": metadata,
        }
        if canary is not None:
            row["canary"] = canary
        return row
    if fmt == "prompt_completion":
        if messages[-1]["role"] != "assistant":
            raise ValueError("prompt_completion format needs a final assistant message to use as completion")
        prompt, completion = messages[:-1], messages[-1]["content"]
        simple = len(prompt) == 1 and prompt[0]["role"] == "user"
        return {"prompt": prompt[0]["content"] if simple else [dict(m) for m in prompt],
                "completion": completion, "metadata": metadata}
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# ----------------------------------------------------------------------------- files

def read_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    """Reads a chat JSONL file in any of the three layouts (may differ line by line).

    Blank lines are skipped; a malformed line raises ValueError naming file:line.
    """
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            records.append(normalize_row(row, where))
    return records


def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str], fmt: str = "messages") -> int:
    """Writes records as JSONL in layout `fmt`; returns the number of lines written."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            validate_record(record, f"record {index}")
            handle.write(json.dumps(to_row(record, fmt), ensure_ascii=False) + "\n")
            count += 1
    return count


# ----------------------------------------------------------------------------- datasets.Dataset

def from_hf_dataset(dataset: Any, name: str = "<datasets.Dataset>") -> list[Record]:
    """A `datasets.Dataset` whose rows use any of the three layouts -> chat records."""
    return [normalize_row(row, f"{name}[{index}]") for index, row in enumerate(dataset)]


def to_hf_dataset(records: list[Record], fmt: str = "messages") -> Any:
    """Chat records -> `datasets.Dataset` (imported lazily: most callers never need it)."""
    import datasets

    return datasets.Dataset.from_list([to_row(record, fmt) for record in records])
