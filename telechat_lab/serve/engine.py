"""One base model in memory with several LoRA / DoRA adapters (PEFT's multi-adapter PeftModel), each served under
its own name, the base under its own. Generation is chat's (HuggingFaceEngine.stream: the same generate call and
streamer), one request at a time under a lock; the adapter is chosen with `set_adapter`, the base is run with
`disable_adapter()`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from telechat_lab.chat.engines import HuggingFaceEngine
from telechat_lab.errors import ConfigError
from telechat_lab.tokenizer import EOS_ID


def served_adapters(adapters) -> dict[str, str]:
    """`adapters` ({name: dir}, a list of dirs, or one dir) as {name: dir}; a directory's name names it."""
    if adapters in (None, "", [], {}):
        return {}
    if isinstance(adapters, dict):
        return {str(name): str(path) for name, path in adapters.items()}
    paths = [adapters] if isinstance(adapters, str) else list(adapters)
    named: dict[str, str] = {}
    for path in paths:
        name = Path(str(path).rstrip("/")).name
        if name in named:
            raise ConfigError(
                f"adapters: two adapters are named '{name}' ({named[name]} and {path}); "
                "name them yourself: adapters={a: DIR, b: DIR}"
            )
        named[name] = str(path)
    return named


@dataclass
class Generation:
    """One request's generation: the ids generate produced (the prompt's first), and how it ended."""

    prompt_tokens: int
    max_new_tokens: int
    ids: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    @property
    def completion_ids(self) -> list[int]:
        return self.ids[self.prompt_tokens :]

    @property
    def finish_reason(self) -> str:
        out = self.completion_ids
        return "stop" if (out and out[-1] == EOS_ID) or len(out) < self.max_new_tokens else "length"


class _Recorded:
    """The streamer generate writes to, recording every id it is given."""

    def __init__(self, streamer, job: Generation):
        self.streamer, self.job = streamer, job

    def put(self, value):
        self.job.ids += value.reshape(-1).tolist()
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


class MultiAdapterEngine(HuggingFaceEngine):
    def __init__(
        self,
        base: Path,
        base_name: str,
        adapters: dict[str, Path],
        dtype: str = "auto",
        attn_implementation: str = "auto",
        device: str = "auto",
    ):
        super().__init__(base, adapters, dtype, attn_implementation, device)
        self.base_name = base_name
        self.names = [base_name, *adapters]
        self._lock = threading.Lock()
        self._job: Generation | None = None

    @staticmethod
    def _with_adapters(model, adapters: dict[str, Path]):
        """Every adapter on the one base, each under its name (PEFT's multi-adapter model), none merged."""
        from peft import PeftModel

        (first, path), *others = adapters.items()
        model = PeftModel.from_pretrained(model, str(path), adapter_name=first)
        for name, path in others:
            model.load_adapter(str(path), adapter_name=name)
        return model

    def generate(self, name: str, prompt_ids: list[int], generation: dict) -> tuple[Generation, Iterator[str]]:
        """(the record of this generation, its text as it comes). Requests wait their turn; closing the iterator
        early stops the generation after its current token."""
        job = Generation(len(prompt_ids), int(generation.get("max_new_tokens", 512)))
        return job, self._run(job, name, prompt_ids, generation)

    def _run(self, job: Generation, name: str, prompt_ids: list[int], generation: dict) -> Iterator[str]:
        with self._lock:
            self._job = job
            try:
                if name == self.base_name:
                    chosen = self.model.disable_adapter() if len(self.names) > 1 else nullcontext()
                else:
                    self.model.set_adapter(name)
                    chosen = nullcontext()
                with chosen:
                    try:
                        yield from self.stream(prompt_ids, generation)
                    finally:  # the client left, or it failed: the generation thread ends before the next one
                        if job.started:
                            job.done.wait()
            finally:
                self._job = None

    def _generate(self, inputs, streamer, kwargs, stop, errors):
        # `stop` is set by chat's stream() when its reader stops (the client left): generation ends at its next token
        job = self._job
        job.started = True
        try:
            super()._generate(inputs, _Recorded(streamer, job), kwargs, stop, errors)
        finally:
            job.done.set()
