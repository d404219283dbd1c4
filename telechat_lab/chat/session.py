"""Conversation state and the terminal loop (batch mode: chat/batch.py). Prompts are encoded by the training encoder
(telechat_lab.data.encoder), so chat sends exactly the tokens the model was trained on.

Prompt length: a prompt longer than `max_input_tokens` (default: the model's length minus max_new_tokens)
loses its earliest whole turns, with a warning, until it fits; one whose system prompt and last message alone
do not fit is refused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import TextIO

from telechat_lab.data.encoder import ChatEncoder, TemplateOptions
from telechat_lab.data.formats import Conversation
from telechat_lab.errors import UserError

HELP = "Type a message; 'clear' forgets the conversation, 'exit' (or Ctrl+D) quits, Ctrl+C stops an answer."


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
        self.tokenizer_dir = tokenizer_dir
        self.encoder = ChatEncoder(tokenizer_dir, TemplateOptions(cutoff_len=10**9, default_system=default_system))
        self.model_encoders: dict[str, ChatEncoder] = {}  # serve: a model whose default system prompt differs
        self.system = system
        self.generation = dict(generation or {})
        self.turns: list[tuple[str, str]] = []
        model_length = getattr(engine, "max_length", None)
        if max_input_tokens is None and model_length:
            max_input_tokens = max(1, model_length - int(self.generation.get("max_new_tokens", 0)))
        self.max_input_tokens = max_input_tokens

    def add_model_default_system(self, model: str, default_system: str | None) -> None:
        """Prompts to `model` (a served adapter's name) fall back to `default_system`."""
        if default_system != self.encoder.options.default_system:
            options = TemplateOptions(cutoff_len=10**9, default_system=default_system)
            self.model_encoders[model] = ChatEncoder(self.tokenizer_dir, options)

    def encoder_for(self, model: str) -> ChatEncoder:
        """The encoder of prompts to `model`."""
        return self.model_encoders.get(model, self.encoder)

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

    def reply(self, message: str) -> Iterator[str]:
        """Streams the answer to `message` and records the turn; an answer stopped part-way (Ctrl+C, or the
        caller closes the generator) is recorded as far as it went."""
        ids, dropped = self.prompt_ids(message)
        if dropped:
            print(
                f"(the conversation is too long for the model: its first {dropped} turn(s) are left out)",
                file=sys.stderr,
                flush=True,
            )
        pieces = []
        try:
            with closing(self.engine.stream(ids, self.generation)) as stream:
                for piece in stream:
                    pieces.append(piece)
                    yield piece
        except (KeyboardInterrupt, GeneratorExit):
            if pieces:
                self.turns.append((message, "".join(pieces)))
            raise
        self.turns.append((message, "".join(pieces)))

    def clear(self) -> None:
        self.turns = []


def _read_line(stdin) -> str | None:
    """One line of input as text; None at the end. Bytes that are not UTF-8 raise UnicodeDecodeError."""
    raw = stdin.buffer.readline() if hasattr(stdin, "buffer") else stdin.readline()
    if not raw:
        return None
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def _on_terminal(stdin: TextIO, stdout: TextIO) -> bool:
    return stdin is sys.stdin and stdout is sys.stdout and stdin.isatty() and stdout.isatty()


@contextmanager
def _line_editing(on: bool) -> Iterator[None]:
    """On a terminal: `input()` with readline's line editing and a history kept between sessions in the cache
    directory (arrow keys move and recall instead of reaching the model as escape codes)."""
    if not on:
        yield
        return
    import readline

    from telechat_lab import cache_root

    history = cache_root() / "chat_history"
    readline.set_history_length(1000)
    with suppress(OSError):
        readline.read_history_file(history)
    try:
        yield
    finally:
        with suppress(OSError):
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)


def interactive(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """The terminal loop. Ctrl+C stops the answer being written (the prompt comes back, the conversation is
    kept); at the prompt it starts a new line, and quits when it follows another Ctrl+C within a second (no line
    typed between); Ctrl+D or 'exit' quits."""
    terminal = _on_terminal(stdin, stdout)
    print(HELP, file=stdout, flush=True)
    last_interrupt = -1.0
    with _line_editing(terminal):
        while True:
            try:
                if terminal:
                    print(file=stdout)
                    line = input("User: ") + "\n"
                else:
                    print("\nUser: ", end="", file=stdout, flush=True)
                    line = _read_line(stdin)
            except UnicodeDecodeError as err:
                print(
                    f"That line is not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}); "
                    "please type it again.",
                    file=stdout,
                    flush=True,
                )
                continue
            except EOFError:  # Ctrl+D on the terminal
                line = None
            except KeyboardInterrupt:
                if time.monotonic() - last_interrupt < 1.0:
                    print("\nQuit (Ctrl+C twice).", file=stdout, flush=True)
                    return
                last_interrupt = time.monotonic()
                print("\n(Ctrl+C again quits; so do Ctrl+D and 'exit')", file=stdout, flush=True)
                continue
            if line is None:  # end of input
                print(file=stdout, flush=True)
                break
            last_interrupt = -1.0  # a line in between: the next Ctrl+C is a first one
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
                with closing(session.reply(message)) as pieces:
                    print("Assistant: ", end="", file=stdout, flush=True)
                    for piece in pieces:
                        print(piece, end="", file=stdout, flush=True)
            except PromptTooLong as err:
                print(f"{err}; shorten it, or 'clear' the conversation.", file=stdout, flush=True)
            except KeyboardInterrupt:
                last_interrupt = time.monotonic()
                print(" [stopped]", end="", file=stdout, flush=True)
            print(file=stdout, flush=True)
