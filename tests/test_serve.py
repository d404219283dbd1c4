"""`telechat-lab serve`: one server for the module (a tiny base rigged to answer with a tool call, two adapters on
it), driven with the official `openai` client; plus the conversion of OpenAI messages and tool calls, in-process."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from test_export_chat import make_adapter, tool_calling_model

from telechat_lab.data.encoder import ChatEncoder
from telechat_lab.serve.engine import served_adapters
from telechat_lab.serve.protocol import Message, RequestError, to_conversation
from telechat_lab.serve.tool_calls import parse_tool_calls
from telechat_lab.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CALL = {"name": "weather", "arguments": {}}  # what the rigged base answers (few enough quotes to spell uniquely)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
PARIS = {"name": "weather", "arguments": {"city": "Paris"}}
GREEDY = {"temperature": 0, "max_tokens": 8}


def unique_ids(encoder, text: str) -> list[int]:
    """`text` as ids with no id twice (the rigged model maps each token to the next): a piece already used is
    spelt again with one-character pieces, or bytes (SentencePiece's byte fallback), not used yet."""
    sp, used = encoder.sp, []
    for i in encoder.encode_text(text):
        if i not in used:
            used.append(i)
            continue
        for char in sp.id_to_piece(i):
            raw = " " if char == "\u2581" else char
            options = [sp.piece_to_id(char), *(sp.piece_to_id(f"<0x{b:02X}>") for b in raw.encode())]
            spare = [o for o in options if o not in used and o != sp.unk_id()]
            assert spare or raw == " ", f"cannot spell {text!r} without repeating {char!r}"
            used += spare[:1]  # a space between JSON tokens may go
    return used


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server, started as a user starts it; stopped at the end even when a test fails (and it stops by itself
    after its lifetime)."""
    from telechat_lab.tiny import write_tiny_checkpoint

    work = tmp_path_factory.mktemp("serve")
    tiny_dir = write_tiny_checkpoint(work / "tiny", hidden_size=64, training_seqlen=1024)  # room for a tools block
    call_text = "<tool_call>" + json.dumps(CALL) + "</tool_call>"
    base = tool_calling_model(tiny_dir, work / "base", unique_ids(ChatEncoder(tiny_dir), call_text))
    alpha, beta = make_adapter(base, work / "alpha", seed=1), make_adapter(base, work / "beta", seed=2)
    port = free_port()
    log = open(work / "server.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from telechat_lab.cli import main; main()",
            "serve",
            f"model.path={base}",
            "model.name=tele",
            "model.dtype=float32",
            "device=cpu",
            f"adapters={{alpha:{alpha},beta:{beta}}}",
            f"port={port}",
            "lifetime=600",
        ],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (work / "server.log").read_text()
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start:\n" + (work / "server.log").read_text()
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        server = {"client": client, "url": url, "proc": proc, "log": work / "server.log"}
        yield {**server, "base": base, "alpha": alpha, "beta": beta}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def ask(client, model, text, **kw):
    messages = [{"role": "user", "content": text}]
    return client.chat.completions.create(model=model, messages=messages, **{**GREEDY, **kw})


@pytest.mark.slow
def test_models_are_the_base_and_each_adapter(served):
    assert sorted(m.id for m in served["client"].models.list()) == ["alpha", "beta", "tele"]


@pytest.mark.slow
def test_streamed_text_equals_the_non_streamed(served):
    client = served["client"]
    whole = ask(client, "alpha", "Hello there")
    stream = ask(client, "alpha", "Hello there", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens <= 8
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    # /v1/completions continues the text as it is: the rigged base goes on from the tag with the rest of its call
    text = client.completions.create(model="tele", prompt="<tool_call>", temperature=0, max_tokens=40)
    streamed = client.completions.create(model="tele", prompt="<tool_call>", temperature=0, max_tokens=40, stream=True)
    assert text.choices[0].finish_reason == "stop" and text.choices[0].text.endswith("}}</tool_call>")
    assert json.loads(text.choices[0].text.removesuffix("</tool_call>")) == CALL
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


@pytest.mark.slow
def test_each_adapter_answers_as_chat_does(served):
    from telechat_lab import api

    prompts = ["Who are you?", "Tell me about Paris"]
    answers = {}
    for name in ("alpha", "beta"):
        session = api.chat(
            [
                f"model.path={served['base']}",
                f"adapter_path={served[name]}",
                "model.dtype=float32",
                "device=cpu",
                "generation.do_sample=false",
                "generation.max_new_tokens=8",
            ]
        )
        for prompt in prompts:
            expected = "".join(session.reply(prompt))
            session.clear()
            answers[name, prompt] = ask(served["client"], name, prompt).choices[0].message.content
            assert answers[name, prompt] == expected, (name, prompt)
    assert [answers["alpha", p] for p in prompts] != [answers["beta", p] for p in prompts]  # not one adapter


@pytest.mark.slow
def test_tool_call_round_trip(served, tiny_dir):
    client = served["client"]
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="tele", messages=question, tools=TOOLS, temperature=0, max_tokens=40)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "weather" and json.loads(call.function.arguments) == CALL["arguments"]
    streamed = client.chat.completions.create(
        model="tele", messages=question, tools=TOOLS, temperature=0, max_tokens=40, stream=True
    )
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [("weather", CALL["arguments"])]
    conversation = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    second = client.chat.completions.create(
        model="tele", messages=conversation, tools=TOOLS, temperature=0, max_tokens=40
    )
    template = [
        *question,
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]},
        {"role": "tool", "content": "Sunny, 21 C"},
    ]
    expected = load_tokenizer(tiny_dir).apply_chat_template(
        template, tools=TOOLS, add_generation_prompt=True, return_dict=False
    )
    assert second.usage.prompt_tokens == len(expected)  # the result went in with its <tool_response> tags


@pytest.mark.slow
def test_eight_concurrent_clients_all_get_answers(served):
    client = served["client"]

    def question(name):
        return ask(client, name, f"Question {name}", max_tokens=4)

    alone = {name: question(name).choices[0].message.content for name in ("alpha", "beta")}
    names = ["alpha", "beta", "tele", "alpha", "beta", "tele", "alpha", "beta"]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(question, names))
    assert all(r.choices[0].message.content is not None or r.choices[0].message.tool_calls for r in replies)
    for name, reply in zip(names, replies):
        if name in alone:  # each got its own adapter's answer, not another request's
            assert reply.choices[0].message.content == alone[name]


@pytest.mark.slow
def test_bad_requests_are_400_and_the_server_goes_on(served):
    client = served["client"]
    with pytest.raises(openai.BadRequestError) as unknown:
        ask(client, "gamma", "Hi")
    assert unknown.value.status_code == 400 and "alpha, beta" in unknown.value.message
    assert unknown.value.body["code"] == "model_not_found" and unknown.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as malformed:
        client.chat.completions.create(model="alpha", messages=[{"role": "assistant", "content": "first?"}])
    assert malformed.value.body["type"] == "invalid_request_error" and "start with a user" in malformed.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        ask(client, "alpha", "word " * 1200)
    assert too_long.value.body["code"] == "context_length_exceeded" and "1016" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as missing:
        client.chat.completions.create(model="alpha", messages=[{"content": "no role"}])
    assert "role" in missing.value.message
    broken = httpx.post(
        f"{served['url']}/chat/completions", content="{broken", headers={"content-type": "application/json"}, timeout=30
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    assert ask(client, "alpha", "Still there?").choices[0].message.content is not None


@pytest.mark.slow
def test_sigterm_stops_the_server_cleanly(served):
    proc = served["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    log = served["log"].read_text()
    assert "server stopped (SIGTERM)" in log and "Traceback" not in log, log


# ------------------------------------------------------------------------------------------- in-process, no server


def test_messages_encode_as_the_chat_template(tiny_dir):
    """OpenAI messages with a tool call and its result: the same prompt tokens as the tokenizer's chat template."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [{"type": "function", "function": PARIS}]},
        {"role": "tool", "content": "Sunny"},
        {"role": "tool", "content": "Warm"},
    ]
    openai_style = [dict(m) for m in messages]
    openai_style[2] = {
        **messages[2],
        "tool_calls": [{"type": "function", "function": {**PARIS, "arguments": '{"city": "Paris"}'}}],
    }
    conversation = to_conversation([Message(**m) for m in openai_style], TOOLS)
    ids = ChatEncoder(tiny_dir).prompt_ids(conversation)
    expected = load_tokenizer(tiny_dir).apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, return_dict=False
    )
    assert ids == expected


@pytest.mark.parametrize(
    "messages, where",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1]"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "messages"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "messages[1]"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
    ],
)
def test_malformed_messages_name_the_message(messages, where):
    with pytest.raises(RequestError) as err:
        to_conversation([Message(**m) for m in messages])
    assert err.value.param == where and err.value.status == 400


def test_tool_calls_are_parsed_and_malformed_ones_kept_as_text():
    answer = 'Sure.\n<tool_call>\n{"name": "weather", "arguments": {"city": "巴黎"}}\n</tool_call>'
    content, calls = parse_tool_calls(answer)
    assert content == "Sure." and calls[0]["function"] == {"name": "weather", "arguments": '{"city": "巴黎"}'}
    for text in ("<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>{"):
        assert parse_tool_calls(text) == (text, [])


def test_adapters_by_dir_name_and_clashes(tmp_path):
    assert served_adapters([str(tmp_path / "run1"), f"{tmp_path}/run2/"]) == {
        "run1": str(tmp_path / "run1"),
        "run2": f"{tmp_path}/run2/",
    }
    assert served_adapters({"a": "/x"}) == {"a": "/x"}
    with pytest.raises(ValueError, match="two adapters are named 'run1'"):
        served_adapters([str(tmp_path / "a" / "run1"), str(tmp_path / "b" / "run1")])


def test_a_busy_port_is_refused_before_the_model_loads(tiny_dir, capsys):
    from telechat_lab.config.schema import ServeConfig, ServeModelConfig
    from telechat_lab.errors import UserError
    from telechat_lab.serve import run_serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UserError, match=f"port={port}: cannot listen on 127.0.0.1:{port}"):
            run_serve(ServeConfig(model=ServeModelConfig(path=str(tiny_dir)), port=port))
    assert "loading" not in capsys.readouterr().err


def test_without_the_serve_extra_the_message_names_it(monkeypatch):
    from telechat_lab.config.schema import ServeConfig
    from telechat_lab.errors import UserError
    from telechat_lab.serve import run_serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'telechat-lab\[serve\]'"):
        run_serve(ServeConfig())


def test_served_names_need_a_base_and_must_differ(tiny_dir):
    from telechat_lab.config.schema import ServeConfig, ServeModelConfig
    from telechat_lab.errors import ConfigError
    from telechat_lab.serve import served_models

    with pytest.raises(ConfigError, match="no adapters to take the base from"):
        served_models(ServeConfig())
    base, name, adapters = served_models(ServeConfig(model=ServeModelConfig(path=str(tiny_dir))))
    assert (base, name, adapters) == (tiny_dir.resolve(), tiny_dir.name, {})
    with pytest.raises(ConfigError, match="'x' names the base model"):
        served_models(ServeConfig(model=ServeModelConfig(path=str(tiny_dir), name="x"), adapters={"x": "/nowhere"}))


def serve_here(tiny_dir, **settings):
    """run_serve in this process (the main thread, where signals land) on the tiny model, on a free port."""
    from telechat_lab.config.schema import ServeConfig, ServeModelConfig
    from telechat_lab.serve import run_serve

    config = ServeConfig(model=ServeModelConfig(path=str(tiny_dir), dtype="float32"), device="cpu", port=free_port())
    for key, value in settings.items():
        setattr(config, key, value)
    run_serve(config)


def test_ctrl_c_stops_the_server_and_the_command_ends_normally(tiny_dir, capsys):
    answers = []

    def client():
        url = f"http://127.0.0.1:{port}/v1"
        for _ in range(300):
            try:
                answers.append(httpx.get(f"{url}/models", timeout=2).json()["data"][0]["id"])
                break
            except httpx.TransportError:
                time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    port = free_port()
    waiter = threading.Thread(target=client, daemon=True)
    waiter.start()
    serve_here(tiny_dir, port=port, lifetime=120)  # returns: no KeyboardInterrupt
    waiter.join(10)
    assert answers == [tiny_dir.name]
    assert "server stopped (SIGINT)" in capsys.readouterr().err


def test_the_server_stops_by_itself_after_its_lifetime(tiny_dir, capsys):
    start = time.monotonic()
    serve_here(tiny_dir, lifetime=1)
    assert time.monotonic() - start < 60
    assert "server stopped (its lifetime of 1 s is over)" in capsys.readouterr().err


def test_ctrl_c_while_the_model_loads_is_one_message(tiny_dir, monkeypatch):
    from telechat_lab.errors import Interrupted
    from telechat_lab.serve import engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.MultiAdapterEngine, "__init__", interrupted)
    with pytest.raises(Interrupted, match="while the model was loading") as err:
        serve_here(tiny_dir)
    assert err.value.exit_code == 130
