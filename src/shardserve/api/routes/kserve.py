"""Open Inference Protocol (KServe v2): health, server and model metadata, and text in, text
out for generative models (``/generate`` as Triton's generate extension, ``/infer`` with a
``text_input`` BYTES tensor)."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Depends, Request, Response
from pydantic import ValidationError

from shardserve.api.auth import Principal, principal, require_admin
from shardserve.api.errors import APIError
from shardserve.api.protocol import GenerateRequest, InferRequest
from shardserve.api.routes.openai import (
    _last,
    _start,
    deployment,
    embed_batch,
    encode,
    generative,
)
from shardserve.config import repository_configs
from shardserve.engine.errors import PipelineError
from shardserve.sampling_params import SamplingParams

router = APIRouter()
_PARAMS = {f for f in SamplingParams.__dataclass_fields__}


@router.get("/v2")
async def server_metadata() -> dict:
    from shardserve import __version__

    return {"name": "shardserve", "version": __version__, "extensions": ["generate"]}


@router.get("/v2/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> dict:
    return {"ready": True}


@router.get("/v2/repository/index")
async def repository_index(request: Request, who: Principal = Depends(principal)
                           ) -> list[dict]:
    host = request.app.state.host
    return [row for row in host.index()
            if who.may_use(row["name"], host.deployments[row["name"]].config.tenants)]


@router.get("/v2/repository/devices")
async def devices(request: Request, who: Principal = Depends(require_admin)) -> list[dict]:
    """shardserve extension: each device's budget, bytes planned and models."""
    return request.app.state.host.device_usage()


@router.post("/v2/repository/models/{name}/load")
async def load(name: str, request: Request, who: Principal = Depends(require_admin)) -> dict:
    """Place and start a model of the repository; refused (and nothing changed) if it does
    not fit. The other models keep serving meanwhile."""
    host, repo = request.app.state.host, request.app.state.repository
    if name in host.deployments:
        return {"name": name, "state": "READY"}
    configs = {c.name: c for c in repository_configs(repo)} if repo else {}
    if name not in configs:
        raise APIError(404, f"no model named {name!r} in the repository")
    try:
        await asyncio.to_thread(host.load, configs[name])
    except ValueError as e:
        raise APIError(400, f"cannot load {name!r}: {e}") from None
    return {"name": name, "state": "READY"}


@router.post("/v2/repository/models/{name}/unload")
async def unload(name: str, request: Request, who: Principal = Depends(require_admin)
                 ) -> dict:
    """Stop taking requests for the model, finish the running ones, free its devices."""
    try:
        await asyncio.to_thread(request.app.state.host.unload, name)
    except KeyError:
        raise APIError(404, f"model {name!r} is not loaded") from None
    return {"name": name, "state": "UNAVAILABLE"}


@router.get("/v2/models/{name}")
async def model_metadata(name: str, request: Request,
                         who: Principal = Depends(principal)) -> dict:
    pipe = _pipeline(request, name, who)
    if pipe is not None:
        text = [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
        return {"name": name, "versions": ["1"], "platform": "shardserve_pipeline",
                "inputs": text, "outputs": [
                    {"name": "text_output", "datatype": "BYTES", "shape": [1]}] + [
                    {"name": s.name, "datatype": "BYTES", "shape": [1]}
                    for s in pipe.config.steps if s.kind != "embed"]}
    dep = deployment(request, name, who)
    if dep.is_encoder:
        width = dep.model.spec.num_labels or dep.model.spec.hidden_size
        return {"name": name, "versions": ["1"], "platform": "shardserve_encoder",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [-1]},
                           {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}],
                "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, width]}]}
    text = [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    return {"name": name, "versions": ["1"], "platform": "shardserve_llm", "inputs": text,
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]}


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, request: Request,
                      who: Principal = Depends(principal)) -> Response:
    if _pipeline(request, name, who) is None:
        deployment(request, name, who)
    return Response(status_code=200)


@router.post("/v2/models/{name}/generate")
async def generate(name: str, body: GenerateRequest, request: Request,
                   who: Principal = Depends(principal)) -> dict:
    text = await _complete(request, name, who, body.text_input, body.parameters)
    return {"model_name": name, "model_version": "1", "text_output": text}


@router.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request, who: Principal = Depends(principal)) -> dict:
    # Clients (tritonclient among them) send JSON without a JSON content type: parse it here.
    if request.headers.get("inference-header-content-length"):
        raise APIError(400, "the binary tensor extension is not supported; send JSON tensors "
                            "(binary_data=False)")
    try:
        body = InferRequest.model_validate_json(await request.body())
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise APIError(400, f"invalid field {field!r}: {first['msg']}") from None
    # We always answer with JSON tensors, which every client reads.
    body.parameters.pop("binary_data_output", None)
    pipe = _pipeline(request, name, who)
    if pipe is not None:
        return await _infer_pipeline(pipe, body)
    dep = deployment(request, name, who)
    if dep.is_encoder:
        return await _infer_encoder(request, dep, body)
    text = await _complete(request, name, who, _single_text(body), body.parameters)
    return {"model_name": name, "model_version": "1", "id": body.id or "",
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1],
                         "data": [text]}]}


def _single_text(body: InferRequest) -> str:
    """The one string of a request whose only input is text_input, BYTES, shape [1]."""
    if len(body.inputs) != 1 or body.inputs[0].name != "text_input":
        raise APIError(400, "expected exactly one input, named text_input")
    t = body.inputs[0]
    if t.datatype != "BYTES" or t.shape != [1] or len(t.data) != 1 \
            or not isinstance(t.data[0], str):
        raise APIError(400, "text_input must be a BYTES tensor of shape [1] holding one "
                            "string")
    return t.data[0]


def _pipeline(request: Request, name: str, who: Principal):
    pipe = request.app.state.host.pipelines.get(name)
    return pipe if pipe is not None and who.may_use(name) else None


async def _infer_pipeline(pipe, body: InferRequest) -> dict:
    """A pipeline: text_input in; text_output (the last step's) and every labelled or
    generated step's output by name."""
    try:
        ctx = await pipe.run(_single_text(body))
    except PipelineError as e:
        raise APIError(500, f"pipeline {pipe.name!r}: {e}") from None
    outputs = [{"name": "text_output", "datatype": "BYTES", "shape": [1],
                "data": [str(ctx["output"])]}]
    outputs += [{"name": s.name, "datatype": "BYTES", "shape": [1], "data": [str(ctx[s.name])]}
                for s in pipe.config.steps if s.kind != "embed"]
    return {"model_name": pipe.name, "model_version": "1", "id": body.id or "",
            "outputs": outputs}


async def _infer_encoder(request: Request, dep, body: InferRequest) -> dict:
    """Encoders: ``text_input`` (BYTES, [N]) or ``input_ids`` (INT32/INT64, [N, T]) in,
    ``embedding`` (FP32, [N, H]) out (logits for a classifier)."""
    if len(body.inputs) != 1:
        raise APIError(400, f"expected exactly one input (text_input or input_ids), got "
                            f"{len(body.inputs)}")
    t = body.inputs[0]
    count = 1
    for dim in t.shape:
        count *= dim
    if t.name == "text_input":
        if t.datatype != "BYTES" or len(t.shape) != 1:
            raise APIError(400, "text_input must be a BYTES tensor of shape [N]")
        if len(t.data) != count or not all(isinstance(x, str) for x in t.data):
            raise APIError(400, f"text_input has shape {t.shape} but holds {len(t.data)} "
                                "values; it must hold that many strings")
        ids = [encode(dep, x) for x in t.data]
    elif t.name == "input_ids":
        if t.datatype not in ("INT32", "INT64") or len(t.shape) != 2:
            raise APIError(400, "input_ids must be an INT32 or INT64 tensor of shape [N, T]")
        if len(t.data) != count or not all(isinstance(x, int) for x in t.data):
            raise APIError(400, f"input_ids has shape {t.shape} but holds {len(t.data)} "
                                "integers")
        T = t.shape[1]
        ids = [t.data[i * T:(i + 1) * T] for i in range(t.shape[0])]
    else:
        raise APIError(400, "the input must be named text_input or input_ids")
    truncate = bool(body.parameters.get("truncate", False))
    vectors = await embed_batch(request, dep, ids, truncate)
    width = len(vectors[0])
    return {"model_name": dep.config.name, "model_version": "1", "id": body.id or "",
            "outputs": [{"name": "embedding", "datatype": "FP32",
                         "shape": [len(vectors), width],
                         "data": [float(x) for v in vectors for x in v]}]}


async def _complete(request: Request, name: str, who: Principal, prompt: str,
                    parameters: dict) -> str:
    dep = generative(deployment(request, name, who))
    unknown = sorted(set(parameters) - _PARAMS)
    if unknown:
        raise APIError(400, f"unknown parameter {unknown[0]!r}; known: {sorted(_PARAMS)}")
    try:
        params = SamplingParams(**parameters)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e).split(", got ")[0]) from None
    outputs = await _start(request, dep, encode(dep, prompt), params,
                           f"v2-{uuid.uuid4().hex}", prompt)
    return (await _last(outputs)).outputs[0].text
