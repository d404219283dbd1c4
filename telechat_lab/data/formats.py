"""Records in each dataset format -> one `Conversation`: a system prompt, tools, and alternating
user / assistant turns (SPEC.md section 6). Tool calls and tool results become the assistant and user
text TeleChat2 was trained on (`<tool_call>...`, `<tool_response>...`).

A record that cannot be trained on as written raises `BadRecord` (with `data.on_bad_record=skip` it is
skipped and counted): a required field missing, null or not a string, an empty reply, turns that do not
alternate, a conversation that does not start with the user or ends without a reply. Consecutive messages of
one side are joined only where that is what they mean: a reply followed by its tool call(s), and several tool
results in a row.

The other kinds of data (registry.py): `to_prompted` gives a preference record (`"ranking": true`) as its prompt
(a Conversation of the earlier turns, and the last user message) with its chosen and rejected replies, and a KTO
record as its prompt with its one completion and its `kto_tag` (the conversation's last reply is the completion);
`to_text` gives a pre-training record's text."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from telechat_lab.errors import BadRecord
from telechat_lab.tokenizer import format_tool_call, format_tool_response

from .registry import DatasetSpec

USER, ASSISTANT = "user", "assistant"
TEXT, CALL, RESULT = "text", "call", "result"
JOINABLE = {(ASSISTANT, TEXT, CALL), (ASSISTANT, CALL, CALL), (USER, RESULT, RESULT)}  # (side, before, after)


@dataclass
class Conversation:
    system: str | None  # None or "": the configured default system prompt
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user text, assistant text)
    tools: list | None = None  # the tool definitions, parsed


@dataclass
class Prompted:
    """A prompt (`conv`: system, tools and the earlier turns; `query`: the last user message) and the replies
    that follow it: [chosen, rejected] of a preference pair, [completion] of a KTO example (`tag`: desirable)."""

    conv: Conversation
    query: str
    replies: list[str]
    tag: bool | None = None


def to_text(spec: DatasetSpec, record: dict, where: str) -> str:
    """A pre-training document: the `prompt` column (LLaMA-Factory's `{"prompt": "text"}`), joined by a newline
    with the `query` column where the entry maps one."""
    text = _required_text(record, spec.column("prompt"), where, "prompt")
    if "query" in spec.columns:
        query = _optional_text(record.get(spec.column("query")), where, spec.column("query"))
        text = text + "\n" + query if query else text
    if not text.strip():
        raise BadRecord(where, "empty text")
    return text


def to_prompted(spec: DatasetSpec, record: dict, where: str) -> Prompted:
    """A preference (spec.kind "pairwise") or KTO ("kto") record as its prompt and replies."""
    if spec.kind == "kto":
        conv = to_conversation(spec, record, where)
        column = spec.column("kto_tag")
        if column not in record:
            raise BadRecord(where, f"missing column '{column}'", f" (columns.kto_tag; the record has {sorted(record)})")
        tag = record[column]
        if not isinstance(tag, bool):
            raise BadRecord(where, f"{column} is not true or false", f" (got {tag!r}; JSON true or false)")
        (query, completion), history = conv.turns[-1], conv.turns[:-1]
        return Prompted(Conversation(conv.system, history, conv.tools), query, [completion], tag)
    if spec.formatting == "alpaca":
        system, history, query, tools = _alpaca_prompt(spec, record, where)
        replies = [
            _reply(_required_text(record, spec.column(key), where, key), f"{where}: {key}")
            for key in ("chosen", "rejected")
        ]
        return Prompted(Conversation(system, history, tools), query, replies)
    system, parsed = _sharegpt_messages(spec, record, where)
    merged = _merge(parsed, where)
    if merged[-1][0] != USER:
        raise BadRecord(
            where, "the conversation does not end with the user's message", " (a preference record's prompt)"
        )
    history, query = _turns_of(merged[:-1], where), merged[-1][2]
    replies = [_preference_reply(spec, record, key, where) for key in ("chosen", "rejected")]
    return Prompted(Conversation(system, history, tools_of(record.get(spec.column("tools")), where)), query, replies)


def _preference_reply(spec: DatasetSpec, record: dict, key: str, where: str) -> str:
    """The chosen or rejected message of a sharegpt preference record: an assistant message or a function call
    (or a plain string)."""
    column = spec.column(key)
    if column not in record:
        raise BadRecord(where, f"missing column '{column}'", f" (columns.{key}; the record has {sorted(record)})")
    msg, spot = record[column], f"{where}: {column}"
    if isinstance(msg, str):
        return _reply(msg, spot)
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    if not isinstance(msg, dict) or role_tag not in msg or content_tag not in msg:
        raise BadRecord(spot, f"not a message with '{role_tag}' and '{content_tag}'")
    role, content = msg[role_tag], msg[content_tag]
    if role not in (spec.tag("assistant_tag"), spec.tag("function_tag")):
        raise BadRecord(
            spot,
            f"role '{role}' is not the assistant's",
            f" (expected {spec.tag('assistant_tag')!r} or {spec.tag('function_tag')!r})",
        )
    if content is None:
        raise BadRecord(spot, f"{content_tag} is null")
    content = _reply(_optional_text(content, spot, content_tag), spot)
    return _tool_calls_text(content) if role == spec.tag("function_tag") else content


def to_conversation(spec: DatasetSpec, record: dict, where: str) -> Conversation:
    """`where` ("dataset 'x': file line N") prefixes every error."""
    if spec.formatting == "alpaca":
        return _alpaca(spec, record, where)
    if spec.formatting == "sharegpt":
        return _sharegpt(spec, record, where)
    return _telechat(spec, record, where)


def _optional_text(value: Any, where: str, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecord(where, f"{what} is not a string", f" (got {type(value).__name__})")
    return value


def _required_text(record: dict, column: str, where: str, key: str) -> str:
    if column not in record:
        raise BadRecord(where, f"missing column '{column}'", f" (columns.{key}; the record has {sorted(record)})")
    value = record[column]
    if value is None:
        raise BadRecord(where, f"{column} is null")
    return _optional_text(value, where, column)


def _reply(text: str, where: str) -> str:
    if not text or text.isspace():  # `not text.strip()`, without copying the text
        raise BadRecord(where, "empty reply", " (nothing but <_end> would be trained)")
    return text


def _alpaca(spec: DatasetSpec, record: dict, where: str) -> Conversation:
    prompt = _required_text(record, spec.column("prompt"), where, "prompt")
    response = _reply(_required_text(record, spec.column("response"), where, "response"), where)
    system, turns, user, tools = _alpaca_prompt(spec, record, where, prompt)
    return Conversation(system=system, turns=[*turns, (user, response)], tools=tools)


def _alpaca_prompt(
    spec: DatasetSpec, record: dict, where: str, prompt: str | None = None
) -> tuple[str, list[tuple[str, str]], str, list | None]:
    """(system, history turns, last user message, tools) of an alpaca record."""
    if prompt is None:
        prompt = _required_text(record, spec.column("prompt"), where, "prompt")
    query = _optional_text(record.get(spec.column("query")), where, spec.column("query"))
    history = record.get(spec.column("history")) or []
    if not isinstance(history, list):
        raise BadRecord(where, "history is not a list", " (of [query, answer] pairs)")
    turns = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise BadRecord(where, "history item is not a [query, answer] pair", f" (history[{i}])")
        turns.append((pair[0], _reply(pair[1], f"{where}: history[{i}]")))
    if not (prompt + query).strip():
        raise BadRecord(where, "empty prompt")
    system = _optional_text(record.get(spec.column("system")), where, spec.column("system"))
    user = prompt + "\n" + query if query else prompt
    return system, turns, user, tools_of(record.get(spec.column("tools")), where)


def _messages(spec: DatasetSpec, record: dict, where: str) -> list:
    """The record's list of messages (sharegpt, telechat)."""
    column = spec.column("messages")
    if column not in record:
        raise BadRecord(where, f"missing column '{column}'", f" (columns.messages; the record has {sorted(record)})")
    if not isinstance(record[column], list):
        raise BadRecord(where, f"'{column}' is not a list of messages")
    return record[column]


def _sharegpt(spec: DatasetSpec, record: dict, where: str) -> Conversation:
    system, parsed = _sharegpt_messages(spec, record, where)
    return Conversation(
        system=system, turns=_pair_turns(parsed, where), tools=tools_of(record.get(spec.column("tools")), where)
    )


def _sharegpt_messages(spec: DatasetSpec, record: dict, where: str) -> tuple[str, list[tuple[str, str, str, int]]]:
    """(system, the messages as (side, kind, text, index)) of a sharegpt record, tags mapped."""
    messages = _messages(spec, record, where)
    role_tag, content_tag = spec.tag("role_tag"), spec.tag("content_tag")
    roles = {
        spec.tag("user_tag"): (USER, TEXT),
        spec.tag("observation_tag"): (USER, RESULT),
        spec.tag("assistant_tag"): (ASSISTANT, TEXT),
        spec.tag("function_tag"): (ASSISTANT, CALL),
    }
    system = _optional_text(record.get(spec.column("system")), where, spec.column("system"))
    parsed: list[tuple[str, str, str, int]] = []
    for i, msg in enumerate(messages):
        spot = f"{where}: message {i}"
        if not isinstance(msg, dict) or role_tag not in msg or content_tag not in msg:
            raise BadRecord(spot, f"a message without '{role_tag}' and '{content_tag}'")
        role = msg[role_tag]
        if msg[content_tag] is None:
            raise BadRecord(spot, f"{content_tag} is null")
        content = _optional_text(msg[content_tag], spot, content_tag)
        if role == spec.tag("system_tag"):
            if i != 0:
                raise BadRecord(spot, "a system message after the first")
            system = content  # a leading system message overrides the system column
            continue
        if role not in roles:
            raise BadRecord(
                spot,
                f"unknown role '{role}'",
                f"; expected one of {sorted(roles) + [spec.tag('system_tag')]} (set the tags in dataset_info.json)",
            )
        side, kind = roles[role]
        if kind == CALL:
            content = _tool_calls_text(content)
        elif kind == RESULT:
            content = format_tool_response(content)
        parsed.append((side, kind, content, i))
    return system, parsed


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


_TELECHAT_ROLES = {"user": USER, "bot": ASSISTANT, "assistant": ASSISTANT}


def _telechat(spec: DatasetSpec, record: dict, where: str) -> Conversation:
    dialog = _messages(spec, record, where)
    parsed = []
    for i, msg in enumerate(dialog):  # a message's place is spelled out only for an error (most records have none)
        if type(msg) is dict and type(msg.get("content")) is str and msg.get("role") in _TELECHAT_ROLES:
            parsed.append((_TELECHAT_ROLES[msg["role"]], TEXT, msg["content"], i))
            continue
        spot = f"{where}: {spec.column('messages')}[{i}]"
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise BadRecord(spot, "a message without 'role' and 'content'")
        if msg["role"] not in _TELECHAT_ROLES:
            raise BadRecord(spot, f"unknown role '{msg['role']}'", " (expected 'user' or 'bot')")
        if msg["content"] is None:
            raise BadRecord(spot, "content is null")
        parsed.append((_TELECHAT_ROLES[msg["role"]], TEXT, _optional_text(msg["content"], spot, "content"), i))
    system = _optional_text(record.get(spec.column("system")), where, spec.column("system"))
    return Conversation(
        system=system, turns=_pair_turns(parsed, where), tools=tools_of(record.get(spec.column("tools")), where)
    )


def _pair_turns(messages: list[tuple[str, str, str, int]], where: str) -> list[tuple[str, str]]:
    """(side, kind, text, index) messages -> (user, assistant) turns. A reply and the tool call(s) after it, or
    several tool results in a row, join with a newline; any other two messages of one side in a row are an
    error, as are a conversation that starts with the assistant or ends with the user."""
    merged = _merge(messages, where)
    if merged[-1][0] == USER:
        raise BadRecord(where, "the conversation ends without a reply", " (its last message is the user's)")
    return _turns_of(merged, where)


def _merge(messages: list[tuple[str, str, str, int]], where: str) -> list[list]:
    """The messages with those of one side in a row joined ([side, last kind, text]); it starts with the user."""
    merged: list[list] = []  # [side, last kind, text]
    for side, kind, content, index in messages:
        if merged and merged[-1][0] == side:
            if (side, merged[-1][1], kind) not in JOINABLE:
                raise BadRecord(
                    f"{where}: message {index}", "turns do not alternate", f" (two {side} messages in a row)"
                )
            merged[-1][1], merged[-1][2] = kind, merged[-1][2] + "\n" + content
        else:
            merged.append([side, kind, content])
    if not merged:
        raise BadRecord(where, "no messages")
    if merged[0][0] != USER:
        raise BadRecord(where, "the conversation starts with the assistant")
    return merged


def _turns_of(merged: list[list], where: str) -> list[tuple[str, str]]:
    """Merged messages, user first and alternating, as (user, assistant) turns; every reply non-empty."""
    for i in range(1, len(merged), 2):
        _reply(merged[i][2], where)
    return [(merged[i][2], merged[i + 1][2]) for i in range(0, len(merged) - 1, 2)]


def tools_of(value: Any, where: str) -> list | None:
    """The tools column as a list (it may be a JSON string); None when absent or empty."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise BadRecord(where, "the tools column is not valid JSON", f" ({err.msg})") from err
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRecord(where, "tools is not a list of tool definitions")
    return value or None
