"""Chat with a TeleChat2 checkpoint (optionally with adapters, unmerged): generation engines
(transformers, vLLM) and the terminal loop / batch mode."""

from __future__ import annotations

import sys


def make_session(settings):
    """The engine for `settings` (a ChatConfig) in a ChatSession; paths are checked before the model loads."""
    from dataclasses import asdict

    from telechat_lab.resolve import base_and_adapters
    from telechat_lab.trained_prompt import default_system_for

    from .engines import HuggingFaceEngine, VLLMEngine
    from .session import ChatSession

    base, adapters = base_and_adapters(settings.model.path, settings.adapter_path)
    if settings.infer_backend == "vllm":
        engine = VLLMEngine(base, adapters, **asdict(settings.vllm))
    else:
        engine = HuggingFaceEngine(
            base, adapters, settings.model.dtype, settings.model.attn_implementation, settings.device
        )
    default_system = default_system_for(adapters, settings.default_system, "chat")
    return ChatSession(
        engine, base, settings.system, default_system, asdict(settings.generation), settings.max_input_tokens
    )


def run_chat(settings) -> None:
    """chat.py: the terminal loop, or batch mode with `input`. The prompts, and what `output` already holds, are
    checked before the model loads; Ctrl+C while it loads ends the command with 130 and a message."""
    import signal

    from telechat_lab.errors import Interrupted
    from telechat_lab.files import check_input_file

    from .batch import batch, check_output, complete, read_prompts
    from .session import interactive

    try:
        if settings.input:
            if settings.input != "-":
                check_input_file("input", settings.input)
            items = read_prompts(settings.input)
            if settings.output:
                done = check_output(settings.output, items, settings.input, settings.overwrite, settings.resume)
                if done.count == len(items):
                    print(complete(settings.output, settings.input, len(items)), file=sys.stderr)
                    return
        session = make_session(settings)
        if settings.input:
            batch(
                session,
                settings.input,
                settings.output,
                items=items,
                overwrite=settings.overwrite,
                resume=settings.resume,
            )
        else:
            interactive(session)
    except KeyboardInterrupt:
        raise Interrupted("chat: interrupted (Ctrl+C)", signal.SIGINT) from None
