"""Chat with a TeleChat2 checkpoint (optionally with adapters, unmerged): generation engines
(transformers, vLLM) and the terminal loop / batch mode."""

from __future__ import annotations


def run_chat(settings) -> None:
    """chat.py: the engine for `settings` (a ChatConfig), then the terminal loop or batch mode. Inputs and paths
    are checked before the model is loaded."""
    from dataclasses import asdict

    from telechat_lab.resolve import base_and_adapters

    from .engines import HuggingFaceEngine, VLLMEngine
    from .session import ChatSession, batch, interactive, read_prompts

    base, adapters = base_and_adapters(settings.model.path, settings.adapter_path)
    if settings.input and settings.input != "-":
        read_prompts(settings.input)  # a malformed input file fails now, not after the model has loaded
    if settings.infer_backend == "vllm":
        engine = VLLMEngine(base, adapters, **asdict(settings.vllm))
    else:
        engine = HuggingFaceEngine(
            base, adapters, settings.model.dtype, settings.model.attn_implementation, settings.device
        )
    session = ChatSession(
        engine, base, settings.system, settings.default_system, asdict(settings.generation), settings.max_input_tokens
    )
    if settings.input:
        batch(session, settings.input, settings.output)
    else:
        interactive(session)
