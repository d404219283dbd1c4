"""Conversation state, the terminal loop and batch mode. Prompts are encoded by the training encoder
(telechat_lab.data.encoder), so chat sends exactly the tokens the model was trained on.

Prompt length: a prompt longer than `max_input_tokens` (default: the model's length minus max_new_tokens)
loses its earliest whole turns, with a warning, until it fits; one whose system prompt and last message alone
do not fit is refused.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from telechat_lab.data.encoder import ChatEncoder, TemplateOptions
from telechat_lab.data.formats import Conversation
from telechat_lab.errors import DataError, UserError

HELP = "Type a message; 'clear' forgets the conversation, 'exit' quits."


class PromptTooLong(UserError):
    """The system prompt and the last message alone exceed the input budget."""


class ChatSession:
    def __init__(
        self,
        engine,
        tokenizer_dir: Path,
        system: str | None = None,
        default_system: str | None = None,
        generation: dict | None = None,
        max_input_tokens: int | None = None,
    ):
        self.engine = engine
        self.encoder = ChatEncoder(tokenizer_dir, TemplateOptions(cutoff_len=10**9, default_system=default_system))
        self.system = system
        self.generation = dict(generation or {})
        self.turns: list[tuple[str, str]] = []
        model_length = getattr(engine, "max_length", None)
        if max_input_tokens is None and model_length:
            max_input_tokens = max(1, model_length - int(self.generation.get("max_new_tokens", 0)))
        self.max_input_tokens = max_input_tokens

    def prompt_ids(
        self, message: str, turns: list[tuple[str, str]] | None = None, system: str | None = None
    ) -> tuple[list[int], int]:
        """(the prompt's ids, how many earliest turns were dropped to fit `max_input_tokens`)."""
        turns = self.turns if turns is None else turns
        system = self.system if system is None else system
        for dropped in range(len(turns) + 1):
            ids = self.encoder.prompt_ids(Conversation(system=system, turns=[*turns[dropped:], (message, None)]))
            if self.max_input_tokens is None or len(ids) <= self.max_input_tokens:
                return ids, dropped
        raise PromptTooLong(
            f"the message is {len(ids)} tokens with its system prompt, more than the "
            f"{self.max_input_tokens} the model takes as input (max_input_tokens)"
        )

    def reply(self, message: str) -> Iterable[str]:
        """Streams the answer to `message` and records the turn."""
        ids, dropped = self.prompt_ids(message)
        if dropped:
            print(
                f"(the conversation is too long for the model: its first {dropped} turn(s) are left out)",
                file=sys.stderr,
                flush=True,
            )
        pieces = []
        for piece in self.engine.stream(ids, self.generation):
            pieces.append(piece)
            yield piece
        self.turns.append((message, "".join(pieces)))

    def clear(self) -> None:
        self.turns = []


def _read_line(stdin) -> str | None:
    """One line of input as text; None at the end. Bytes that are not UTF-8 raise UnicodeDecodeError."""
    raw = stdin.buffer.readline() if hasattr(stdin, "buffer") else stdin.readline()
    if not raw:
        return None
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def interactive(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    print(HELP, file=stdout, flush=True)
    while True:
        print("\nUser: ", end="", file=stdout, flush=True)
        try:
            line = _read_line(stdin)
        except UnicodeDecodeError as err:
            print(
                f"That line is not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}); "
                "please type it again.",
                file=stdout,
                flush=True,
            )
            continue
        if line is None:  # end of input
            break
        message = line.strip()
        if not message:
            continue
        if message == "exit":
            break
        if message == "clear":
            session.clear()
            print("History cleared.", file=stdout, flush=True)
            continue
        try:
            pieces = session.reply(message)
            print("Assistant: ", end="", file=stdout, flush=True)
            for piece in pieces:
                print(piece, end="", file=stdout, flush=True)
        except PromptTooLong as err:
            print(f"{err}; shorten it, or 'clear' the conversation.", file=stdout, flush=True)
        print(file=stdout, flush=True)


# ------------------------------------------------------------------------------------------------ batch mode

ROLES = {"user": "user", "assistant": "assistant", "bot": "assistant", "system": "system"}


@dataclass
class BatchItem:
    line: int
    record: dict  # what the output line repeats, with the response added
    prompt: str
    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {'null' if value is None else type(value).__name__}")
    return value


def _messages_item(record: dict, where: str, line: int) -> BatchItem:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    system = record.get("system")
    parsed: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        spot = f"{where}: messages[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{spot} must be an object with 'role' and 'content'")
        role = ROLES.get(message["role"])
        if role is None:
            raise DataError(f"{spot}: unknown role {message['role']!r} (user, assistant, system)")
        content = _text(message["content"], spot, "content")
        if role == "system":
            if i:
                raise DataError(f"{spot}: a system message must come first")
            system = content
            continue
        expected = "user" if len(parsed) % 2 == 0 else "assistant"
        if role != expected:
            wanted = "a user message" if expected == "user" else "the assistant's reply"
            raise DataError(
                f"{spot}: expected {wanted} here (user and assistant messages alternate, starting with the user)"
            )
        parsed.append((role, content))
    if not parsed or parsed[-1][0] != "user":
        raise DataError(f"{where}: 'messages' must end with the user message to answer")
    if system is not None:
        _text(system, where, "system")
    turns = [(parsed[i][1], parsed[i + 1][1]) for i in range(0, len(parsed) - 1, 2)]
    return BatchItem(line, {"messages": messages, "system": system}, parsed[-1][1], system, turns)


def _prompt_item(record: dict, where: str, line: int) -> BatchItem:
    key = "prompt" if "prompt" in record else "instruction"
    prompt = _text(record[key], where, key)
    if record.get("input") is not None:
        prompt += "\n" + _text(record["input"], where, "input") if record["input"] else ""
    system = record.get("system")
    if system is not None:
        _text(system, where, "system")
    if not prompt.strip():
        raise DataError(f"{where}: the {key} is empty")
    return BatchItem(line, {"prompt": prompt, "system": system} if system else {"prompt": prompt}, prompt, system)


def read_prompts(source: str, stdin: TextIO = sys.stdin) -> list[BatchItem]:
    """Batch inputs, every line checked before anything is generated: JSON lines ({"prompt"} /
    {"instruction", "input"} / {"messages"}, each with an optional "system") or plain text, one prompt a line;
    `-` reads stdin. DataError names the line at fault."""
    name = "stdin" if source == "-" else source
    raw = (
        stdin.buffer.read()
        if source == "-" and hasattr(stdin, "buffer")
        else (stdin.read() if source == "-" else Path(source).read_bytes())
    )
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    items = []
    for lineno, data in enumerate(raw.splitlines(), 1):
        where = f"{name} line {lineno}"
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: not UTF-8 text (byte {data[err.start]:#04x} at position {err.start})") from err
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            items.append(BatchItem(lineno, {"prompt": line}, line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
        if "messages" in record:
            items.append(_messages_item(record, where, lineno))
        elif "prompt" in record or "instruction" in record:
            items.append(_prompt_item(record, where, lineno))
        else:
            raise DataError(f"{where}: expected 'prompt', 'instruction' or 'messages' (got {sorted(record)})")
    if not items:
        raise DataError(f"{name} holds no prompt")
    return items


def batch(
    session: ChatSession, source: str, output: str | None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout
) -> int:
    """Answer every prompt of `source`; `output` is written only once every answer is there (a failure leaves
    an existing file as it was). Every line and every prompt's length is checked first."""
    from telechat_lab.files import atomic_open

    items = read_prompts(source, stdin)
    prompts = []
    for item in items:
        try:
            prompts.append(session.prompt_ids(item.prompt, item.turns, item.system or session.system))
        except PromptTooLong as err:
            raise DataError(f"{source} line {item.line}: {err}") from err
    for item, (_, dropped) in zip(items, prompts):
        if dropped:
            print(
                f"{source} line {item.line}: its first {dropped} turn(s) are left out to fit the model's length",
                file=sys.stderr,
            )

    def answer_all(out: TextIO) -> None:
        for n, (item, (ids, _)) in enumerate(zip(items, prompts), 1):
            response = "".join(session.engine.stream(ids, session.generation))
            out.write(json.dumps({**item.record, "response": response}, ensure_ascii=False) + "\n")
            out.flush()
            if output:
                print(f"\ranswered {n}/{len(items)}", end="", file=sys.stderr, flush=True)
        if output:
            print(file=sys.stderr)

    if output:
        with atomic_open(output) as out:
            answer_all(out)
    else:
        answer_all(stdout)
    return len(items)
