"""Records in each dataset format -> one `Conversation`: a system prompt, tools, and alternating
user / assistant turns (SPEC.md section 6). Tool calls and tool results become the assistant and user
text TeleChat2 was trained on (`<tool_call>...`, `<tool_response>...`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from telechat_lab.tokenizer import format_tool_call, format_tool_response

from .registry import DataError, DatasetSpec

USER, ASSISTANT = "user", "assistant"


@dataclass
class Conversation:
    system: str | None  # None or "": the configured default system prompt
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user text, assistant text)
    tools: Any = None  # list of tool definitions or its JSON string


def to_conversation(spec: DatasetSpec, record: dict, where: str) -> Conversation:
    """`where` ("dataset 'x': file line N") prefixes every error."""
    if spec.formatting == "alpaca":
        return _alpaca(spec, record, where)
    if spec.formatting == "sharegpt":
        return _sharegpt(spec, record, where)
    return _telechat(spec, record, where)


def _text(value: Any, where: str, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _required(record: dict, column: str, where: str, key: str) -> Any:
    if column not in record:
        raise DataError(f"{where}: missing required column '{column}' (columns.{key}); "
                        f"the record has {sorted(record)}")
    return record[column]


def _alpaca(spec: DatasetSpec, record: dict, where: str) -> Conversation:
    prompt = _text(_required(record, spec.column("prompt"), where, "prompt"), where, "prompt")
    response = _text(_required(record, spec.column("response"), where, "response"), where, "response")
    query = _text(record.get(spec.column("query")), where, "query")
    history = record.get(spec.column("history")) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: history must be a list of [query, answer] pairs")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{where}: history[{i}] must be a [query, answer] pair of strings")
        turns.append((pair[0], pair[1]))
    turns.append((prompt + "\n" + query if query else prompt, response))
    system = _text(record.get(spec.column("system")), where, "system")
    return Conversation(system=system, turns=turns, tools=record.get(spec.column("tools")))


def _sharegpt(spec: DatasetSpec, record: dict, where: str) -> Conversation:
    messages = _required(record, spec.column("messages"), where, "messages")
    if not isinstance(messages, list):
        raise DataError(f"{where}: '{spec.column('messages')}' must be a list of messages")
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    sides = {spec.tag("user_tag"): (USER, None), spec.tag("observation_tag"): (USER, "observation"),
             spec.tag("assistant_tag"): (ASSISTANT, None), spec.tag("function_tag"): (ASSISTANT, "function_call")}
    system = _text(record.get(spec.column("system")), where, "system")
    parsed: list[tuple[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or role_tag not in msg or content_tag not in msg:
            raise DataError(f"{where}: message {i} must be an object with '{role_tag}' and '{content_tag}'")
        role, content = msg[role_tag], _text(msg[content_tag], f"{where}: message {i}", content_tag)
        if role == spec.tag("system_tag"):
            if i != 0:
                raise DataError(f"{where}: message {i}: a system message must come first")
            system = content  # a leading system message overrides the system column
            continue
        if role not in sides:
            raise DataError(f"{where}: message {i}: unknown role '{role}'; expected one of "
                            f"{sorted(sides) + [spec.tag('system_tag')]} (set tags in dataset_info.json)")
        side, kind = sides[role]
        if kind == "function_call":
            content = _tool_calls_text(content)
        elif kind == "observation":
            content = format_tool_response(content)
        parsed.append((side, content))
    return Conversation(system=system, turns=_pair_turns(parsed, where), tools=record.get(spec.column("tools")))


def _tool_calls_text(content: str) -> str:
    """A function_call value (a JSON call, or a list of them) as the chat template renders tool calls:
    one `<tool_call>` block per call, JSON re-dumped the template's way (non-ASCII kept as is); a
    value that is not such JSON is wrapped as it is."""
    try:
        calls = json.loads(content)
    except json.JSONDecodeError:
        calls = None
    calls = calls if isinstance(calls, list) else [calls]
    if calls and all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c for c in calls):
        return "\n".join(format_tool_call(c["name"], c["arguments"]) for c in calls)
    return "<tool_call>\n" + content + "\n</tool_call>"


def _telechat(spec: DatasetSpec, record: dict, where: str) -> Conversation:
    dialog = _required(record, spec.column("messages"), where, "messages")
    if not isinstance(dialog, list):
        raise DataError(f"{where}: '{spec.column('messages')}' must be a list of {{role, content}}")
    roles = {"user": USER, "bot": ASSISTANT, "assistant": ASSISTANT}
    parsed = []
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DataError(f"{where}: dialog[{i}] must be an object with 'role' and 'content'")
        if msg["role"] not in roles:
            raise DataError(f"{where}: dialog[{i}]: unknown role '{msg['role']}'; expected 'user' or 'bot'")
        parsed.append((roles[msg["role"]], _text(msg["content"], f"{where}: dialog[{i}]", "content")))
    system = _text(record.get(spec.column("system")), where, "system")
    return Conversation(system=system, turns=_pair_turns(parsed, where), tools=record.get(spec.column("tools")))


def _pair_turns(messages: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    """Consecutive messages of one side (a reply then its tool call, several tool results) join with
    a newline; a conversation must start with the user, and a trailing user message (no reply to
    train on) is left out."""
    merged: list[list[str]] = []
    for side, content in messages:
        if merged and merged[-1][0] == side:
            merged[-1][1] += "\n" + content
        else:
            merged.append([side, content])
    if merged and merged[0][0] != USER:
        raise DataError(f"{where}: the conversation must start with a user (or observation) message")
    return [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged) - 1, 2)]


def tools_of(value: Any, where: str) -> list | None:
    """The tools column as a list (it may be a JSON string); None when absent or empty."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: the tools column is not valid JSON ({err.msg})") from err
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{where}: tools must be a list of tool definitions (objects)")
    return value or None
