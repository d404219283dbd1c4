"""Conversation state, the terminal loop and batch mode. Prompts are encoded by the training
encoder (telechat_lab.data.template), so chat sends exactly the tokens the model was trained on."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from telechat_lab.data.formats import Conversation
from telechat_lab.data.template import ChatEncoder, TemplateOptions

HELP = "Type a message; 'clear' forgets the conversation, 'exit' quits."


class ChatSession:
    def __init__(self, engine, tokenizer_dir: Path, system: str | None = None, default_system: str | None = None,
                 generation: dict | None = None):
        self.engine = engine
        self.encoder = ChatEncoder(tokenizer_dir, TemplateOptions(cutoff_len=10**9, default_system=default_system))
        self.system = system
        self.generation = dict(generation or {})
        self.turns: list[tuple[str, str]] = []

    def prompt_ids(self, message: str) -> list[int]:
        return self.encoder.prompt_ids(Conversation(system=self.system, turns=[*self.turns, (message, None)]))

    def reply(self, message: str) -> Iterable[str]:
        """Streams the answer to `message` and records the turn."""
        pieces = []
        for piece in self.engine.stream(self.prompt_ids(message), self.generation):
            pieces.append(piece)
            yield piece
        self.turns.append((message, "".join(pieces)))

    def clear(self) -> None:
        self.turns = []


def interactive(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    print(HELP, file=stdout, flush=True)
    while True:
        print("\nUser: ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
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
        print("Assistant: ", end="", file=stdout, flush=True)
        for piece in session.reply(message):
            print(piece, end="", file=stdout, flush=True)
        print(file=stdout, flush=True)


def read_prompts(source: str, stdin: TextIO = sys.stdin) -> list[dict]:
    """Batch inputs: JSON lines ({"prompt"} / {"instruction", "input"} / {"messages"}) or plain text,
    one prompt a line; `-` reads stdin."""
    text = stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{source} line {lineno}: malformed JSON ({err.msg})") from err
            if "messages" in record:
                system = record.get("system") or next(
                    (m["content"] for m in record["messages"] if m.get("role") == "system"), None)
                if not any(m.get("role") == "user" for m in record["messages"]):
                    raise ValueError(f"{source} line {lineno}: 'messages' has no user message to answer")
                items.append({"messages": record["messages"], "system": system})
            elif "prompt" in record or "instruction" in record:
                prompt = record.get("prompt") or record["instruction"]
                if record.get("input"):
                    prompt += "\n" + record["input"]
                items.append({"prompt": prompt, "system": record.get("system")})
            else:
                raise ValueError(f"{source} line {lineno}: expected 'prompt', 'instruction' or 'messages'")
        else:
            items.append({"prompt": line})
    return items


def batch(session: ChatSession, source: str, output: str | None, stdin: TextIO = sys.stdin,
          stdout: TextIO = sys.stdout) -> int:
    items = read_prompts(source, stdin)
    configured_system = session.system
    out = open(output, "w", encoding="utf-8") if output else stdout
    try:
        for item in items:
            session.clear()
            # a record's own system prompt for that record only; otherwise the configured one
            session.system = item.get("system") or configured_system
            if "messages" in item:
                turns = item["messages"]
                users = [m["content"] for m in turns if m["role"] == "user"]
                bots = [m["content"] for m in turns if m["role"] in ("assistant", "bot")]
                session.turns = list(zip(users[:-1], bots))
                prompt = users[-1]
            else:
                prompt = item["prompt"]
            response = "".join(session.reply(prompt))
            out.write(json.dumps({**item, "response": response}, ensure_ascii=False) + "\n")
            out.flush()
    finally:
        session.system = configured_system
        if output:
            out.close()
    return len(items)
