"""Open Inference Protocol (KServe v2): health, server and model metadata, and text in, text
out for generative models (``/generate`` as Triton's generate extension, ``/infer`` with a
``text_input`` BYTES tensor)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from shardserve.api.errors import APIError
from shardserve.api.protocol import GenerateRequest, InferRequest
from shardserve.api.routes.openai import _last, _start, deployment, encode
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
async def repository_index(request: Request) -> list[dict]:
    return request.app.state.host.index()


@router.get("/v2/models/{name}")
async def model_metadata(name: str, request: Request) -> dict:
    deployment(request, name)
    text = [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    return {"name": name, "versions": ["1"], "platform": "shardserve_llm", "inputs": text,
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]}


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, request: Request) -> Response:
    deployment(request, name)
    return Response(status_code=200)


@router.post("/v2/models/{name}/generate")
async def generate(name: str, body: GenerateRequest, request: Request) -> dict:
    text = await _complete(request, name, body.text_input, body.parameters)
    return {"model_name": name, "model_version": "1", "text_output": text}


@router.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> dict:
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
    if len(body.inputs) != 1 or body.inputs[0].name != "text_input":
        raise APIError(400, "expected exactly one input, named text_input")
    tensor = body.inputs[0]
    if tensor.datatype != "BYTES" or tensor.shape != [1] or len(tensor.data) != 1 \
            or not isinstance(tensor.data[0], str):
        raise APIError(400, "text_input must be a BYTES tensor of shape [1] holding one "
                            "string")
    text = await _complete(request, name, tensor.data[0], body.parameters)
    return {"model_name": name, "model_version": "1", "id": body.id or "",
            "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1],
                         "data": [text]}]}


async def _complete(request: Request, name: str, prompt: str, parameters: dict) -> str:
    dep = deployment(request, name)
    unknown = sorted(set(parameters) - _PARAMS)
    if unknown:
        raise APIError(400, f"unknown parameter {unknown[0]!r}; known: {sorted(_PARAMS)}")
    try:
        params = SamplingParams(**parameters)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None
    outputs = await _start(dep, encode(dep, prompt), params, f"v2-{uuid.uuid4().hex}", prompt)
    return (await _last(outputs)).outputs[0].text
