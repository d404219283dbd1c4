"""The FastAPI app: `/v1/models`, `/v1/chat/completions` and `/v1/completions` (streamed as server-sent events with
sse-starlette, or whole). Chat prompts are built by chat's encoder (ChatSession.encoder), so a request gets
exactly the tokens chat.py sends; `/v1/completions` continues the prompt's text as it is (no chat format).

Requests take turns (an asyncio lock: a waiting request holds no worker thread, so any number of clients get
their answers, in order). Every bad request (unknown model, malformed messages or fields, a prompt over the limit)
is answered with HTTP 400 and OpenAI's error body; a failure while generating is a 500 with the same shape; the
server goes on serving."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .protocol import ChatCompletionRequest, CompletionRequest, RequestError, Sampling, error_body, to_conversation
from .tool_calls import CALL_START, parse_tool_calls

_END = object()


def create_app(engine, session, max_input_tokens: int | None = None) -> FastAPI:
    """`engine`: a MultiAdapterEngine; `session`: the ChatSession whose encoder, system prompt and generation
    settings requests use; `max_input_tokens`: the prompt limit (None: the model's length minus max_tokens)."""
    app = FastAPI(title="telechat-lab")
    created = int(time.time())
    turn = asyncio.Lock()  # one generation at a time: the others wait here, in order, holding no worker thread

    async def generated(pieces: Iterator[str]) -> AsyncIterator[str]:
        """The generation's text, each piece waited for in a worker thread; a client that leaves stops it."""
        async with turn:
            try:
                while (piece := await run_in_threadpool(next, pieces, _END)) is not _END:
                    yield piece
            finally:
                pieces.close()

    async def whole(pieces: Iterator[str]) -> str:
        return "".join([piece async for piece in generated(pieces)])

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, err: RequestError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems, params = [], []
        for problem in err.errors():
            if problem.get("type") == "json_invalid":
                detail = problem.get("ctx", {}).get("error", "")
                problems.append(f"the request body is not valid JSON ({detail} at character {problem['loc'][-1]})")
                continue
            where = ".".join(str(p) for p in problem.get("loc", ())[1:])
            problems.append(f"{where or 'the request body'}: {problem['msg']}")
            params.append(where or None)
        return JSONResponse(error_body("; ".join(problems), params[0] if params else None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        return JSONResponse(error_body(str(err.detail)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):
        return JSONResponse(error_body(f"generation failed: {err}", kind="server_error"), status_code=500)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "telechat-lab"} for name in engine.names
            ],
        }

    def start(req: Sampling, prompt_ids: list[int], what: str):
        if req.model not in engine.names:
            raise RequestError(
                f"model '{req.model}' is not served here; choose one of {', '.join(engine.names)} (GET /v1/models)",
                "model",
                "model_not_found",
            )
        generation = req.generation(session.generation)
        new_tokens = int(generation.get("max_new_tokens", 512))
        limit = max_input_tokens or engine.max_length - new_tokens
        if len(prompt_ids) > limit:
            raise RequestError(
                f"the {what} is {len(prompt_ids)} tokens, more than the {max(limit, 0)} this model takes with "
                f"max_tokens={new_tokens} (its length is {engine.max_length}); shorten it or lower max_tokens",
                "messages" if what == "conversation" else "prompt",
                "context_length_exceeded",
            )
        return engine.generate(req.model, prompt_ids, generation)

    def usage(job) -> dict:
        done = len(job.completion_ids)
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": done, "total_tokens": job.prompt_tokens + done}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        conversation = to_conversation(req.messages, req.tools)
        if conversation.system is None:
            conversation.system = session.system
        job, pieces = start(req, session.encoder_for(req.model).prompt_ids(conversation), "conversation")
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": req.model}
            return json.dumps({**body, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        if req.stream:

            async def events() -> AsyncIterator[str]:
                yield chunk({"role": "assistant", "content": ""})
                text, sent = "", 0
                async for piece in generated(pieces):
                    text += piece
                    held = text.find(CALL_START) if req.tools else -1  # a tool call is sent once it is whole
                    upto = len(text) if held < 0 else held
                    if upto > sent:
                        yield chunk({"content": text[sent:upto]})
                        sent = upto
                content, calls = parse_tool_calls(text[sent:]) if sent < len(text) else (None, [])
                if calls:
                    if content:
                        yield chunk({"content": content})
                    yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
                elif content:
                    yield chunk({"content": content})
                yield chunk({}, "tool_calls" if calls else job.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time())}
                    yield json.dumps({**body, "model": req.model, "choices": [], "usage": usage(job)})
                yield "[DONE]"

            return EventSourceResponse(events())
        text = await whole(pieces)
        content, calls = parse_tool_calls(text) if req.tools else (text, [])
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else job.finish_reason}
            ],
            "usage": usage(job),
        }

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        job, pieces = start(req, session.encoder_for(req.model).encode_text(req.prompt), "prompt")
        reply_id = f"cmpl-{uuid.uuid4().hex}"

        def body(text: str, finish: str | None) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {
                "id": reply_id,
                "object": "text_completion",
                "created": int(time.time()),
                "model": req.model,
                "choices": [choice],
            }

        if req.stream:

            async def events() -> AsyncIterator[str]:
                async for piece in generated(pieces):
                    if piece:
                        yield json.dumps(body(piece, None))
                yield json.dumps(body("", job.finish_reason))
                yield "[DONE]"

            return EventSourceResponse(events())
        text = await whole(pieces)
        return {**body(text, job.finish_reason), "usage": usage(job)}

    return app
