"""Normalise the row formats people ship into one `Conversation`.

messages          {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ..., "weight": 0|1}]}
alpaca            {"instruction": "...", "input": "...", "output": "...", "system"?: "..."}
sharegpt          {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}
prompt_completion {"prompt": "..." | [messages], "completion": "..." | [messages]}
text              {"text": "..."}  (continued pretraining: every token is trained)
"""
from __future__ import annotations

from typing import Any, Callable

from tunesmith._core.errors import DataIssue
from tunesmith.data.conversation import ROLES, Conversation, Message, Source

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}


class RowError(Exception):
    """A problem with one field of one row; turned into a DataIssue with file and line by the caller."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _text(value: Any, field: str) -> str:
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        value = "".join(p.get("text", "") for p in value)  # OpenAI content parts
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {type(value).__name__}")
    return value


def parse_messages(items: Any, field: str) -> list[Message]:
    """A list of OpenAI-style messages, checked; raises RowError naming the bad field."""
    return _messages(items, field)


def _messages(items: Any, field: str, role_key: str = "role", content_key: str = "content",
              role_map: dict[str, str] | None = None) -> list[Message]:
    if not isinstance(items, list) or not items:
        raise RowError(field, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, "must be an object")
        if role_key not in m:
            raise RowError(f"{where}.{role_key}", "is missing")
        role = m[role_key]
        role = role_map.get(role, role) if role_map and isinstance(role, str) else role
        if not isinstance(role, str) or role not in ROLES:
            known = sorted(role_map) if role_map else list(ROLES)
            raise RowError(f"{where}.{role_key}", f"unknown role {m[role_key]!r} (expected one of {known})")
        if content_key not in m or m[content_key] is None:
            raise RowError(f"{where}.{content_key}", "is missing")
        weight = m.get("weight")
        if weight is not None and weight not in (0, 1):
            raise RowError(f"{where}.weight", f"must be 0 or 1, got {weight!r}")
        if weight is not None and role != "assistant":
            raise RowError(f"{where}.weight", "is only allowed on assistant messages")
        out.append(Message(role, _text(m[content_key], f"{where}.{content_key}"), weight))
    return out


def _from_messages(row: dict) -> list[Message]:
    return _messages(row.get("messages"), "messages")


def _from_sharegpt(row: dict) -> list[Message]:
    return _messages(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)


def _from_alpaca(row: dict) -> list[Message]:
    for key in ("instruction", "output"):
        if row.get(key) is None:
            raise RowError(key, "is missing")
    prompt = _text(row["instruction"], "instruction")
    if row.get("input"):
        prompt += "\n\n" + _text(row["input"], "input")
    msgs = [Message("system", _text(row["system"], "system"))] if row.get("system") else []
    return msgs + [Message("user", prompt), Message("assistant", _text(row["output"], "output"))]


def _from_prompt_completion(row: dict) -> list[Message]:
    for key in ("prompt", "completion"):
        if row.get(key) is None:
            raise RowError(key, "is missing")
    p, c = row["prompt"], row["completion"]
    prompt = _messages(p, "prompt") if isinstance(p, list) else [Message("user", _text(p, "prompt"))]
    completion = _messages(c, "completion") if isinstance(c, list) else [Message("assistant", _text(c, "completion"))]
    return prompt + completion


FORMATS: dict[str, Callable[[dict], list[Message]]] = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def detect_format(row: dict) -> str:
    """Name the format from the row's fields, the non-null ones first: a Parquet file or a dataset folder
    that mixes formats gives every row every column, null where the row has none. Then from every field, so
    a row whose format's field is null is told that field is missing."""
    for fields in ({k for k, v in row.items() if v is not None}, set(row)):
        if "messages" in fields:
            return "messages"
        if "conversations" in fields:
            return "sharegpt"
        if {"instruction", "output"} <= fields:
            return "alpaca"
        if {"prompt", "completion"} <= fields:
            return "prompt_completion"
        if "text" in fields:
            return "text"
    raise RowError(None, f"cannot tell the format from fields {sorted(row)}: expected 'messages', "
                         "'conversations', 'instruction'+'output', 'prompt'+'completion' or 'text'")


def to_conversation(row: Any, fmt: str, source: Source) -> Conversation:
    """Normalise one row; raises RowError naming the field at fault."""
    if not isinstance(row, dict):
        raise RowError(None, f"each row must be a JSON object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "text":
        if row.get("text") is None:
            raise RowError("text", "is missing")
        text = _text(row["text"], "text")
        if not text.strip():
            raise RowError("text", "is empty")
        return Conversation(text=text, source=source)
    messages = FORMATS[fmt](row)
    if not any(m.role == "assistant" for m in messages):
        raise RowError("messages" if fmt == "messages" else None, "conversation has no assistant turn")
    if not any(m.trained for m in messages):
        raise RowError("messages", "every assistant turn has weight 0, so nothing would be trained")
    return Conversation(messages=tuple(messages), source=source)


def to_issue(err: RowError, source: Source) -> DataIssue:
    return DataIssue(source.file, source.line, err.field, err.message)
