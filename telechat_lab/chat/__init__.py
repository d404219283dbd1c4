"""Chat with a TeleChat2 checkpoint (optionally with adapters, unmerged): generation engines
(transformers, vLLM) and the terminal loop / batch mode."""

from __future__ import annotations


def make_session(settings):
    """The engine for `settings` (a ChatConfig) in a ChatSession; paths are checked before the model loads."""
    from dataclasses import asdict

    from telechat_lab.resolve import base_and_adapters

    from .engines import HuggingFaceEngine, VLLMEngine
    from .session import ChatSession, read_prompts

    base, adapters = base_and_adapters(settings.model.path, settings.adapter_path)
    if settings.input and settings.input != "-":
        read_prompts(settings.input)  # a malformed input file fails now, not after the model has loaded
    if settings.infer_backend == "vllm":
        engine = VLLMEngine(base, adapters, **asdict(settings.vllm))
    else:
        engine = HuggingFaceEngine(
            base, adapters, settings.model.dtype, settings.model.attn_implementation, settings.device
        )
    return ChatSession(
        engine, base, settings.system, settings.default_system, asdict(settings.generation), settings.max_input_tokens
    )


def run_chat(settings) -> None:
    """chat.py: the terminal loop, or batch mode with `input`."""
    from telechat_lab.files import check_input_file, check_new_output

    from .session import batch, interactive

    if settings.input and settings.input != "-":  # before the model loads
        check_input_file("input", settings.input)
    if settings.input and settings.output:
        check_new_output("output", settings.output, settings.overwrite)
    session = make_session(settings)
    if settings.input:
        batch(session, settings.input, settings.output)
    else:
        interactive(session)
