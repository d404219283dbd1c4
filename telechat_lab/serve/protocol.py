"""The OpenAI API's requests (the fields this server reads; others are accepted and ignored), its error shape,
and OpenAI chat messages as the project's Conversation, so that chat's encoder builds the prompt: tool calls
become the assistant's `<tool_call>` text and `tool` messages the user's `<tool_response>` text, as the data
formats write them for training (telechat_lab.data.formats)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from telechat_lab.data.formats import Conversation
from telechat_lab.tokenizer import format_tool_call, format_tool_response


class RequestError(Exception):
    """A bad request: HTTP `status` with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict:
        return error_body(self.message, self.param, self.code)


def error_body(message: str, param: str | None = None, code: str | None = None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints take; None: the server's `generation` setting."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def generation(self, defaults: dict) -> dict:
        options = dict(defaults)
        if self.max_tokens is not None:
            options["max_new_tokens"] = self.max_tokens
        if self.temperature is not None:
            options["temperature"] = self.temperature
            options["do_sample"] = self.temperature > 0
        if self.top_p is not None:
            options["top_p"] = self.top_p
        return options


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def generation(self, defaults: dict) -> dict:
        options = super().generation(defaults)
        if self.max_completion_tokens is not None:
            options["max_new_tokens"] = self.max_completion_tokens
        return options


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.content[{i}]: only text parts are supported", f"{where}.content")
        texts.append(part["text"])
    return "".join(texts)


def _calls_text(calls: list[dict], where: str) -> str:
    """An assistant's tool_calls as the `<tool_call>` blocks TeleChat2 writes (one a call, newline-joined)."""
    blocks = []
    for i, call in enumerate(calls):
        function = call.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{where}.tool_calls[{i}]: expected {{type, function: {{name, arguments}}}}", where)
        blocks.append(format_tool_call(function["name"], function.get("arguments") or {}))
    return "\n".join(blocks)


def to_conversation(messages: list[Message], tools: list | None = None) -> Conversation:
    """OpenAI messages as a Conversation whose last turn is the user's message (or tool results) to answer. A
    system (or developer) message may come first only; user and assistant then alternate, several tool results in
    a row join (as do an assistant's text and its tool calls)."""
    system = None
    sides: list[list] = []  # [side, text, was it tool results]
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role in ("system", "developer"):
            if i:
                raise RequestError(f"{where}: a system message must come first", where)
            system = _text(message.content, where)
            continue
        if message.role == "assistant":
            side, text = "assistant", _text(message.content, where)
            if message.tool_calls:
                calls = _calls_text(message.tool_calls, where)
                text = f"{text}\n{calls}" if text else calls
        elif message.role == "tool":
            side, text = "user", format_tool_response(_text(message.content, where))
        else:
            side, text = "user", _text(message.content, where)
        results = message.role == "tool"
        if sides and sides[-1][0] == side:
            if not (results and sides[-1][2]):
                raise RequestError(
                    f"{where}: two {side} messages in a row (user and assistant messages alternate, "
                    "starting with the user; only tool results may follow each other)",
                    where,
                )
            sides[-1][1] += "\n" + text
            continue
        if not sides and side != "user":
            raise RequestError(f"{where}: the conversation must start with a user message", where)
        sides.append([side, text, results])
    if not sides or sides[-1][0] != "user":
        raise RequestError("messages: the last message must be the user's (or tool results) to answer", "messages")
    texts = [text for _, text, _ in sides]
    turns = [(texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2)]
    return Conversation(system=system, turns=[*turns, (texts[-1], None)], tools=tools or None)
