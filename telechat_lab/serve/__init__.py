"""`telechat-lab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra) on the
transformers engine, with several adapters on one base, each served under its own name (engine), OpenAI's
requests and errors (protocol), TeleChat2's tool calls as OpenAI `tool_calls` (tool_calls) and the app (app).

It stops cleanly on Ctrl+C or SIGTERM (requests under way are finished for a few seconds, then it exits 0), or by
itself after `lifetime` seconds."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path


def _check_port(host: str, port: int) -> None:
    """Before the model loads: the address must be free."""
    from telechat_lab.errors import UserError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(
                f"port={port}: cannot listen on {host}:{port} ({err.strerror}); choose another port=..."
            ) from err


def served_models(settings) -> tuple[Path, str, dict[str, Path]]:
    """(the base directory, the name it is served under, {adapter name: directory}), every path checked."""
    from telechat_lab.errors import ConfigError
    from telechat_lab.resolve import base_and_adapters

    from .engine import served_adapters

    named = served_adapters(settings.adapters)
    clash = "adapters: '{}' names the base model (model.name, else its directory's name); name the adapter otherwise"
    if settings.model.name in named:  # before the adapters' files are read
        raise ConfigError(clash.format(settings.model.name))
    if not settings.model.path and not named:
        raise ConfigError("model.path is not set and there are no adapters to take the base from: set model.path=DIR")
    base, paths = base_and_adapters(settings.model.path, list(named.values()), stacked=False)
    base_name = settings.model.name or base.name
    if base_name in named:
        raise ConfigError(clash.format(base_name))
    return base, base_name, dict(zip(named, paths))


def load(settings):
    """(engine, ChatSession) for `settings` (a ServeConfig)."""
    from dataclasses import asdict

    from telechat_lab.chat.session import ChatSession
    from telechat_lab.trained_prompt import default_system_for

    from .engine import MultiAdapterEngine

    base, base_name, adapters = served_models(settings)
    print("loading the model ...", file=sys.stderr, flush=True)
    model = settings.model
    engine = MultiAdapterEngine(base, base_name, adapters, model.dtype, model.attn_implementation, settings.device)
    session = ChatSession(engine, base, settings.system, settings.default_system, asdict(settings.generation))
    for name, adapter in adapters.items():  # each adapter's prompts as its run trained them
        session.add_model_default_system(name, default_system_for([adapter], settings.default_system, "serve"))
    return engine, session


def run_serve(settings) -> None:
    """Serve until Ctrl+C, SIGTERM or `settings.lifetime`."""
    from telechat_lab.errors import Interrupted, UserError

    try:
        import uvicorn

        from .app import create_app
    except ImportError as err:
        raise UserError(
            f"serve needs the `serve` extra ({err.name} is missing): pip install 'telechat-lab[serve]'"
        ) from err
    _check_port(settings.host, settings.port)
    try:
        engine, session = load(settings)
    except KeyboardInterrupt:
        raise Interrupted("serve: stopped by Ctrl+C while the model was loading", signal.SIGINT) from None
    app = create_app(engine, session, settings.max_input_tokens)
    server = uvicorn.Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=5, log_level="info")
    )
    stopped: list[str] = []
    if settings.lifetime:

        def end_of_life():
            stopped.append(f"its lifetime of {settings.lifetime:g} s is over")
            server.should_exit = True

        timer = threading.Timer(settings.lifetime, end_of_life)
        timer.daemon = True
        timer.start()
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again for the program to handle:
    # here it is recorded, and the command ends normally
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda sig, frame: stopped.append(signal.Signals(sig).name)) for sig in handled}
    url = f"http://{settings.host}:{settings.port}/v1"
    print(f"serving {', '.join(engine.names)} at {url} (Ctrl+C stops)", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"server stopped ({stopped[0] if stopped else 'shut down'})", file=sys.stderr, flush=True)
