"""Batch mode: answer a file of prompts (`input=FILE`, or `-` for stdin), one JSON line per prompt, to
`output` (or stdout).

The answers are appended as they come, each line flushed and fsync'ed, so an interruption loses at most the
answer being written. Each line repeats its prompt's record, which is how a rerun knows what is done: the same
command continues after the last answer (`resuming: 300 of 1000 answered in OUT`); a half-written last line (a
kill -9 mid-write) is dropped and answered again; a file whose lines answer other prompts, or that is not
chat's output, is refused unless overwrite=true (which replaces it, from its first new answer on; resume=false
refuses any existing file). A complete file is said to be complete, and nothing is generated.

Signals: the first SIGINT (Ctrl+C) or SIGTERM lets the answer being written finish, and stops; a second one
stops that answer at once (it is not kept). Either way the answers so far stay, the message says how many and
how to continue, and the exit code is the shell's (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TextIO

from telechat_lab.errors import ConfigError, DataError, Interrupted

from .session import ChatSession, PromptTooLong

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


def source_name(source: str) -> str:
    """What a batch input is called in messages: its path, or stdin for `-`."""
    return "stdin" if source == "-" else source


def read_prompts(source: str, stdin: TextIO = sys.stdin) -> list[BatchItem]:
    """Batch inputs, every line checked before anything is generated: JSON lines ({"prompt"} /
    {"instruction", "input"} / {"messages"}, each with an optional "system") or plain text, one prompt a line;
    `-` reads stdin. DataError names the line at fault."""
    name = source_name(source)
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


class Answered(NamedTuple):
    """What an existing output file already holds for these prompts."""

    count: int  # its first `count` lines answer the first `count` prompts
    size: int  # bytes of those lines (what follows is a half-written line, dropped)


def answer_line(item: BatchItem, response: str) -> str:
    """The output line of one answer: its prompt's record and the response."""
    return json.dumps({**item.record, "response": response}, ensure_ascii=False) + "\n"


def answered(output: str, items: list[BatchItem], source: str) -> Answered:
    """Check an existing output file against the prompts: ConfigError when it is not this input's answers."""
    data = Path(output).expanduser().read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    lines = complete.splitlines(keepends=True)
    for n, raw in enumerate(lines):
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("response"), str):
            _refuse(output, f"its line {n + 1} is not an answer written by chat")
        if n >= len(items):
            _refuse(output, f"it holds more answers than the {len(items)} prompts of {source}")
        if {key: value for key, value in row.items() if key != "response"} != items[n].record:
            _refuse(output, f"its line {n + 1} answers another prompt than {source} line {items[n].line}")
    torn = data[len(complete) :]  # a last line without its newline: cut short by a kill while written
    if torn:
        # what the next answer's line starts with, up to its response: the torn line must be a piece of that
        head = answer_line(items[len(lines)], "")[: -len('"}\n')].encode() if len(lines) < len(items) else b""
        if not (head.startswith(torn) or torn.startswith(head)) or not head:
            _refuse(output, f"its line {len(lines) + 1} is not an answer written by chat")
    return Answered(len(lines), len(complete))


def complete(output: str, source: str, total: int) -> str:
    """What a rerun says of an output that answers every prompt."""
    return (
        f"{output} already holds the answers to all {total} prompts of {source}: nothing to do "
        "(overwrite=true answers them again)"
    )


def _refuse(output: str, why: str):
    raise ConfigError(f"output={output} exists: add overwrite=true to replace it, or choose another file ({why})")


def check_output(output: str, items: list[BatchItem], source: str, overwrite: bool, resume: bool) -> Answered:
    """Before the model loads: what `output` already answers (nothing: a new file, or overwrite)."""
    target = Path(output).expanduser()
    if target.is_dir():
        raise ConfigError(f"output={output} is a directory: name a file")
    if overwrite or not target.exists():
        return Answered(0, 0)
    if not resume:
        _refuse(output, "resume=false")
    return answered(output, items, source)


class _Signals:
    """SIGINT / SIGTERM during the batch: the first lets the current answer finish (`signum` says the loop
    stops), a second raises KeyboardInterrupt, which stops the answer being generated at its next token."""

    def __init__(self):
        self.signum: int | None = None
        self.aborted = False

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.aborted = True
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this answer (once more: stop now)",
            file=sys.stderr,
            flush=True,
        )

    @contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Progress:
    """`answered N/M`: a rich bar on a terminal, one plain line per answer when stderr is piped."""

    def __init__(self, total: int, done: int, on: bool):
        self.total, self.bar = total, None
        self.on = on
        if on and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("answered"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("answered", total=total, completed=done)
            self.bar.start()

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        elif self.on:
            print(f"answered {done}/{self.total}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _AnswerFile:
    """The output, opened for appending after its first `keep` bytes at the first answer (overwrite: emptied
    then), each line flushed and fsync'ed."""

    def __init__(self, path: str, keep: int):
        self.path, self.keep, self.file = Path(path).expanduser(), keep, None

    def write(self, line: str) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "r+" if self.path.exists() else "w", encoding="utf-8")  # noqa: SIM115
            self.file.truncate(self.keep)
            self.file.seek(self.keep)
        self.file.write(line)
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Stdout:
    def __init__(self, stdout: TextIO):
        self.stdout = stdout

    def write(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()

    def close(self) -> None:
        pass


def batch(
    session: ChatSession,
    source: str,
    output: str | None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    *,
    items: list[BatchItem] | None = None,
    overwrite: bool = False,
    resume: bool = True,
) -> int:
    """Answer every prompt of `source` (`items`: already read) not yet answered in `output`; returns how many
    prompts there are. Every line and every prompt's length is checked first."""
    items = read_prompts(source, stdin) if items is None else items
    prompts = []
    for item in items:
        try:
            prompts.append(session.prompt_ids(item.prompt, item.turns, item.system or session.system))
        except PromptTooLong as err:
            raise DataError(f"{source} line {item.line}: {err}") from err
    done, keep = check_output(output, items, source, overwrite, resume) if output else (0, 0)
    if done == len(items):
        print(complete(output, source, len(items)), file=sys.stderr)
        return len(items)
    if done:
        print(f"resuming: {done} of {len(items)} answered in {output}", file=sys.stderr, flush=True)
    for item, (_, dropped) in zip(items[done:], prompts[done:]):
        if dropped:
            print(
                f"{source} line {item.line}: its first {dropped} turn(s) are left out to fit the model's length",
                file=sys.stderr,
            )
    out = _AnswerFile(output, keep) if output else _Stdout(stdout)
    progress = _Progress(len(items), done, on=bool(output))
    signals = _Signals()
    try:
        with signals.installed():
            for item, (ids, _) in zip(items[done:], prompts[done:]):
                if signals.signum is not None:
                    break
                response = "".join(session.engine.stream(ids, session.generation))
                out.write(answer_line(item, response))
                done += 1
                progress.update(done)
    except KeyboardInterrupt:
        if signals.signum is None:  # Ctrl+C outside our handler's reach: the same as a second signal
            signals.signum, signals.aborted = signal.SIGINT, True
    finally:
        out.close()
        progress.close()
    if signals.signum is not None and done < len(items):
        how = "stopped at once" if signals.aborted else "stopped"
        where = f"in {output}: run the same command again to answer the rest" if output else "written"
        raise Interrupted(
            f"{signal.Signals(signals.signum).name}: {how}; {done} of {len(items)} answers kept {where}",
            signals.signum,
        )
    if output:  # the answers' place, once they are all there (stdout's answers are where the user sees them)
        print(f"the answers to all {len(items)} prompts of {source_name(source)} are in {output}", file=sys.stderr)
    return len(items)
