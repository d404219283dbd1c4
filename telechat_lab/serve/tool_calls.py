"""TeleChat2's tool calls in a generated answer: `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (the tags
are control ids 9/10, kept by chat's streamer), as OpenAI `tool_calls`. An answer whose calls are not all such JSON
is returned as it is, as plain content."""

from __future__ import annotations

import json
import re
import uuid

CALL_START = "<tool_call>"
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the content outside the calls, or None when there is none; the calls in OpenAI's shape). No call, or one
    that is not a JSON object with a string "name": (text, [])."""
    blocks = _CALL.findall(text)
    if not blocks or text.count(CALL_START) != len(blocks):
        return text, []
    calls = []
    for block in blocks:
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", {})
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
    content = _CALL.sub("", text).strip()
    return content or None, calls
