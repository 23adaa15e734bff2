"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shardserve.api.admission import embed, finish, http_error, in_pool, start_generation
from shardserve.api.auth import Principal, principal
from shardserve.api.errors import APIError, error_body
from shardserve.api.protocol import ChatRequest, CompletionRequest, EmbeddingRequest
from shardserve.engine.errors import InvalidRequest
from shardserve.outputs import RequestOutput

router = APIRouter()
_JINJA = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_DEFAULT_MAX_TOKENS = 16


def deployment(request: Request, name: str, who: Principal):
    """The deployment ``name`` if this caller may use it; another tenant's model is a 404."""
    dep = request.app.state.host.deployments.get(name)
    if dep is None or not who.may_use(name, dep.config.tenants):
        raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")
    return dep


@router.get("/v1/models")
async def list_models(request: Request, who: Principal = Depends(principal)) -> dict:
    host = request.app.state.host
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "shardserve",
         "max_model_len": dep.model.context_len}
        for name, dep in list(host.deployments.items())
        if who.may_use(name, dep.config.tenants)]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      who: Principal = Depends(principal)):
    dep = generative(deployment(request, body.model, who))
    if isinstance(body.prompt, str):
        ids, text = await in_pool(request, encode, dep, body.prompt), body.prompt
    else:
        ids, text = list(body.prompt), None
    params = _params(body, body.logprobs)
    rid = f"cmpl-{uuid.uuid4().hex}"
    gen = await start_generation(request, dep, ids, params, rid, text, who,
                                 stream=bool(body.stream))
    if body.stream:
        return EventStream(_completion_chunks(gen, rid, body), gen.aclose)
    final = await finish(request, gen)
    choices = [{"index": c.index, "text": c.text, "finish_reason": _reason(c.finish_reason),
                "logprobs": _completion_logprobs(dep, c) if body.logprobs is not None else None}
               for c in final.outputs]
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": body.model, "choices": choices, "usage": _usage(final)}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request,
                           who: Principal = Depends(principal)):
    dep = generative(deployment(request, body.model, who))
    prompt, ids = await in_pool(request, chat_prompt, dep, body)
    params = _params(body, (body.top_logprobs or 0) if body.logprobs else None)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    gen = await start_generation(request, dep, ids, params, rid, prompt, who, "messages",
                                 stream=bool(body.stream))
    if body.stream:
        return EventStream(_chat_chunks(gen, rid, body), gen.aclose)
    final = await finish(request, gen)
    choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": _reason(c.finish_reason),
                "logprobs": _chat_logprobs(dep, c) if body.logprobs else None}
               for c in final.outputs]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": body.model, "choices": choices, "usage": _usage(final)}


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request,
                     who: Principal = Depends(principal)) -> JSONResponse:
    dep = deployment(request, body.model, who)
    if not dep.is_encoder:
        raise APIError(400, f"model `{body.model}` is of kind {dep.kind}; embeddings come "
                            "from an encoder model", "model")
    inputs = body.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise APIError(400, "input is empty", "input")
    ids = [await in_pool(request, encode, dep, x) if isinstance(x, str) else list(x)
           for x in inputs]
    vectors = await embed(request, dep, ids, body.truncate)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
             if body.encoding_format == "base64" else v.tolist()}
            for i, v in enumerate(vectors)]
    tokens = sum(map(len, ids))
    # A response object skips FastAPI's jsonable_encoder, which walks every float of every vector.
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


# -- helpers -------------------------------------------------------------------------------
def generative(dep):
    if dep.is_encoder:
        raise APIError(400, f"model `{dep.config.name}` is an encoder; use /v1/embeddings",
                       "model")
    if dep.kind == "recommender":
        raise APIError(400, f"model `{dep.config.name}` is a recommender; score with "
                            f"POST /v2/models/{dep.config.name}/infer", "model")
    if dep.speech is not None:
        raise APIError(400, f"model `{dep.config.name}` is a speech model; use "
                            "/v1/audio/transcriptions", "model")
    return dep


def encode(dep, text: str, add_special_tokens: bool = True) -> list[int]:
    if dep.tokenizer is None:
        raise APIError(400, f"model `{dep.config.name}` has no tokenizer; send token ids",
                       "prompt")
    return dep.tokenizer.encode(text, add_special_tokens=add_special_tokens)


_MARK = re.compile("\ue000(\\d+)\ue001")  # a message's index between private-use characters


def chat_prompt(dep, body: ChatRequest) -> tuple[str, list[int]]:
    """The rendered prompt and its token ids. Special-token text inside a message's content
    (``<|eot_id|>`` typed by a user) is encoded as text, never as a control token: the
    template is rendered with a marker for each content, and the pieces between markers are
    encoded as template text, the contents literally."""
    if dep.tokenizer is None:
        raise APIError(400, f"model `{body.model}` has no tokenizer for chat", "messages")
    messages = [m.model_dump() for m in body.messages]
    prompt, tok = render_chat(dep, body.model, messages), dep.tokenizer
    if not any(tok.has_special_text(m["content"]) for m in messages):
        return prompt, tok.encode(prompt, add_special_tokens=False)
    marked = render_chat(dep, body.model, [{**m, "content": f"\ue000{i}\ue001"}
                                           for i, m in enumerate(messages)])
    ids: list[int] = []
    for i, piece in enumerate(_MARK.split(marked)):
        if i % 2:
            ids += tok.encode_literal(messages[int(piece)]["content"])
        elif piece:
            ids += tok.encode(piece, add_special_tokens=False)
    return prompt, ids


def render_chat(dep, model: str, messages: list[dict]) -> str:
    if dep.chat_template is None:
        raise APIError(400, f"model `{model}` has no chat template (no chat_template in "
                            "its tokenizer_config.json or chat_template.jinja); use "
                            "/v1/completions", "messages", "no_chat_template")
    tok = dep.tokenizer
    try:
        return _JINJA.from_string(dep.chat_template).render(
            messages=messages, add_generation_prompt=True,
            bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    except TemplateError as e:
        raise APIError(400, f"the chat template failed: {e}", "messages") from None


def _params(body, logprobs):
    try:
        return body.sampling_params(_DEFAULT_MAX_TOKENS, logprobs)
    except InvalidRequest as e:  # "top_p must be in (0, 1], got 2.0"
        raise APIError(400, str(e), e.param, "invalid_value") from None


def _reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _usage(out: RequestOutput) -> dict:
    return _stream_usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs))


def _token_text(dep, token: int) -> str:
    return dep.tokenizer.decode([token], skip_special_tokens=False) if dep.tokenizer else ""


def _completion_logprobs(dep, c) -> dict:
    tokens = [_token_text(dep, t) for t in c.token_ids]
    return {"tokens": tokens, "token_logprobs": [lp[t] for t, lp in zip(c.token_ids,
                                                                         c.logprobs or [],
                                                                         strict=False)],
            "top_logprobs": [{_token_text(dep, k): v for k, v in lp.items()}
                             for lp in c.logprobs or []],
            "text_offset": [sum(map(len, tokens[:i])) for i in range(len(tokens))]}


def _chat_logprobs(dep, c) -> dict:
    content = []
    for t, lp in zip(c.token_ids, c.logprobs or [], strict=False):
        content.append({"token": _token_text(dep, t), "logprob": lp[t], "bytes": None,
                        "top_logprobs": [{"token": _token_text(dep, k), "logprob": v,
                                          "bytes": None} for k, v in lp.items() if k != t]})
    return {"content": content}


class EventStream(StreamingResponse):
    """Server-sent events of ``chunks``, ending with ``data: [DONE]``. An error after the
    response started is the last event before ``[DONE]``. ``on_close`` runs however the
    response ends (finished, failed, or the client gone before the first event), so the
    request's admission is always released and an unfinished request aborted."""

    def __init__(self, chunks: AsyncIterator[dict], on_close: Callable[[], Awaitable[None]]
                 ) -> None:
        super().__init__(_events(chunks), media_type="text/event-stream")
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def _events(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as e:  # the response has started: the error is the last event
        err = http_error(e)
        body = error_body("/v1", err.status, err.message, err.param, err.code)
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def _stream_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _completion_chunks(outputs, rid, body) -> AsyncIterator[dict]:
    """One chunk per completion that moved in a step (its text may be empty: clients time
    tokens by chunks); a completion's finish_reason comes once. The outputs are deltas
    (``OutputKind.DELTA``): text that could still become a stop string is held back there."""
    created, tokens, prompt = int(time.time()), 0, 0
    async for out in outputs:
        prompt = len(out.prompt_token_ids)
        for c in out.outputs:
            tokens += len(c.token_ids)
            yield {"id": rid, "object": "text_completion", "created": created,
                   "model": body.model, "choices": [{"index": c.index, "text": c.text,
                                                     "finish_reason": _reason(c.finish_reason),
                                                     "logprobs": None}]}
    if body.stream_options and body.stream_options.include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": body.model,
               "choices": [], "usage": _stream_usage(prompt, tokens)}


async def _chat_chunks(outputs, rid, body) -> AsyncIterator[dict]:
    created, tokens, prompt = int(time.time()), 0, 0

    def chunk(choices: list[dict[str, Any]]) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created,
                "model": body.model, "choices": choices}

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                  "finish_reason": None} for i in range(body.n)])
    async for out in outputs:
        prompt = len(out.prompt_token_ids)
        for c in out.outputs:
            tokens += len(c.token_ids)
            yield chunk([{"index": c.index, "delta": {"content": c.text} if c.text else {},
                          "finish_reason": _reason(c.finish_reason)}])
    if body.stream_options and body.stream_options.include_usage:
        yield {**chunk([]), "usage": _stream_usage(prompt, tokens)}
