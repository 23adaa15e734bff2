"""Open Inference Protocol (KServe v2): health, server and model metadata, and text in, text
out for generative models (``/generate`` as Triton's generate extension, ``/infer`` with a
``text_input`` BYTES tensor), tensors for encoders, and pipelines.

Readiness follows KServe: a model is ready while any of its replicas can serve (503 while it
restarts or after it failed); the server is ready while every model is."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from shardserve.api.admission import (
    embed,
    finish,
    http_error,
    in_pool,
    score,
    start_generation,
    within,
)
from shardserve.api.auth import Principal, principal
from shardserve.api.errors import APIError, invalid_body
from shardserve.api.protocol import GenerateRequest, InferRequest
from shardserve.api.routes.audio import speech_model, transcribe
from shardserve.api.routes.openai import deployment, encode, generative
from shardserve.engine.errors import InvalidRequest, PipelineError
from shardserve.sampling_params import SamplingParams

# Clients such as tritonclient send JSON with no content type: read it as JSON all the same
# (a body declared as anything but JSON is refused with 415 by the request guard).
router = APIRouter(strict_content_type=False)
_PARAMS = {f for f in SamplingParams.__dataclass_fields__}


@router.get("/v2")
async def server_metadata() -> dict:
    from shardserve import __version__

    return {"name": "shardserve", "version": __version__, "extensions": ["generate"]}


@router.get("/v2/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(request: Request) -> JSONResponse:
    down = [n for n, d in list(request.app.state.host.deployments.items()) if not d.ready]
    return JSONResponse({"ready": not down}, status_code=503 if down else 200)


@router.get("/v2/models/{name}")
async def model_metadata(name: str, request: Request,
                         who: Principal = Depends(principal)) -> dict:
    pipe = _pipeline(request, name, who)
    if pipe is not None:
        text = [{"name": "audio", "datatype": "FP32", "shape": [-1]}] \
            if pipe.config.takes_audio else [{"name": "text_input", "datatype": "BYTES",
                                              "shape": [1]}]
        return {"name": name, "versions": ["1"], "platform": "shardserve_pipeline",
                "inputs": text, "outputs": [
                    {"name": "text_output", "datatype": "BYTES", "shape": [1]}] + [
                    {"name": s.name, "datatype": "BYTES", "shape": [1]}
                    for s in pipe.config.steps if s.kind != "embed"]}
    dep = deployment(request, name, who)
    if dep.kind == "recommender":
        spec = dep.model.spec
        return {"name": name, "versions": ["1"], "platform": "shardserve_recommender",
                "inputs": [{"name": "dense", "datatype": "FP32",
                            "shape": [-1, spec.dense_in_features]},
                           {"name": "sparse_values", "datatype": "INT64", "shape": [-1]},
                           {"name": "sparse_lengths", "datatype": "INT32",
                            "shape": [spec.num_tables, -1]}],
                "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1]}]}
    if dep.speech is not None:
        return {"name": name, "versions": ["1"], "platform": "shardserve_speech",
                "inputs": [{"name": "audio", "datatype": "FP32", "shape": [-1, -1]}],
                "outputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"sample_rate": dep.speech.mel.rate,
                               "window_seconds": dep.speech.window_seconds,
                               "max_seconds": request.app.state.limits.max_audio_seconds}}
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
    pipe = _pipeline(request, name, who)
    host = request.app.state.host
    if pipe is not None:
        ok = all(m in host.deployments and host.deployments[m].ready for m in pipe.models())
    else:
        ok = deployment(request, name, who).ready
    return Response(status_code=200 if ok else 503)


@router.post("/v2/models/{name}/generate")
async def generate(name: str, body: GenerateRequest, request: Request,
                   who: Principal = Depends(principal)) -> dict:
    text = await _complete(request, name, who, body.text_input, body.parameters)
    return {"model_name": name, "model_version": "1", "text_output": text}


@router.post("/v2/models/{name}/infer",
             openapi_extra={"requestBody": {"content": {"application/json": {
                 "schema": InferRequest.model_json_schema()}}}})
async def infer(name: str, request: Request, who: Principal = Depends(principal)) -> Response:
    """Tensors in as JSON or binary data, out as JSON or binary data (the binary tensor data
    extension) as the request asks: ``"binary_data": true`` on a requested output, or
    ``"binary_data_output": true`` for all."""
    body = await read_infer(request)
    binary = _binary_outputs(body)
    pipe = _pipeline(request, name, who)
    if pipe is not None:
        return _answer(await _infer_pipeline(request, pipe, body, who), binary)
    dep = deployment(request, name, who)
    if dep.kind == "recommender":
        return _answer(await _infer_recommender(request, dep, body), binary)
    if dep.speech is not None:
        return _answer(await _infer_speech(request, dep, body, who), binary)
    if dep.is_encoder:
        return _answer(await _infer_encoder(request, dep, body), binary)
    text = await _complete(request, name, who, _single_text(body), body.parameters)
    return _answer({"model_name": name, "model_version": "1", "id": body.id or "",
                    "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1],
                                 "data": [text]}]}, binary)


# The binary tensor data extension's element types, little-endian.
_DTYPES = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
           "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2",
           "FP32": "<f4", "FP64": "<f8"}


async def read_infer(request: Request) -> InferRequest:
    """The infer request's JSON; with an ``Inference-Header-Content-Length`` header, the JSON
    is that many bytes and the binary data of the inputs that give a ``binary_data_size``
    follows in input order, decoded here into each input's ``data``."""
    raw = await request.body()
    size = request.headers.get("inference-header-content-length")
    if size is not None and (not size.isdigit() or int(size) > len(raw)):
        raise APIError(400, f"Inference-Header-Content-Length must be the size in bytes of "
                            f"the JSON at the start of the body (at most {len(raw)})")
    cut = len(raw) if size is None else int(size)
    try:
        body = InferRequest.model_validate_json(raw[:cut])
    except ValidationError as e:
        raise invalid_body(e.errors()) from None
    blob, at = memoryview(raw)[cut:], 0
    for t in body.inputs:
        n = t.parameters.get("binary_data_size")
        if n is None:
            if t.data is None:
                raise APIError(400, f"input {t.name!r} has no data: give its values in "
                                    "'data', or as binary data with "
                                    "parameters.binary_data_size")
            continue
        if t.data is not None:
            raise APIError(400, f"input {t.name!r} has both 'data' and binary_data_size; "
                                "send one")
        if type(n) is not int or n < 0 or at + n > len(blob):
            raise APIError(400, f"input {t.name!r}: binary_data_size must be the byte size "
                                f"of its data, within the {len(blob) - at} bytes left in "
                                "the body")
        t.data = _decode(t.name, t.datatype, t.shape, blob[at:at + n])
        at += n
    if at != len(blob):
        raise APIError(400, f"the body has {len(blob) - at} bytes after the binary data of "
                            "its inputs; each binary input needs its binary_data_size")
    return body


def _decode(name: str, datatype: str, shape: list[int], raw: memoryview) -> list:
    """One input's binary data as the flat list JSON would have carried."""
    if any(d < 0 for d in shape):
        raise APIError(400, f"input {name!r}: shape {shape} has a negative dimension")
    count = int(np.prod(shape, dtype=np.int64))
    if datatype == "BYTES":  # each element: its length (4 bytes, little-endian), its bytes
        out, at = [], 0
        while at < len(raw):
            n = int.from_bytes(raw[at:at + 4], "little") if at + 4 <= len(raw) else -1
            if n < 0 or at + 4 + n > len(raw):
                raise APIError(400, f"input {name!r}: BYTES element {len(out)} runs past its "
                                    "binary data (each element is a 4-byte little-endian "
                                    "length, then that many bytes)")
            try:
                out.append(bytes(raw[at + 4:at + 4 + n]).decode())
            except UnicodeDecodeError:
                raise APIError(400, f"input {name!r}: BYTES element {len(out)} is not "
                                    "UTF-8 text") from None
            at += 4 + n
        if len(out) != count:
            raise APIError(400, f"input {name!r} has shape {shape} but its binary data holds "
                                f"{len(out)} elements")
        return out
    if datatype not in _DTYPES:
        raise APIError(400, f"input {name!r}: datatype {datatype!r} is not one of "
                            f"{sorted([*_DTYPES, 'BYTES'])}")
    dtype = np.dtype(_DTYPES[datatype])
    if len(raw) != count * dtype.itemsize:
        raise APIError(400, f"input {name!r}: shape {shape} of {datatype} is "
                            f"{count * dtype.itemsize} bytes, binary_data_size says "
                            f"{len(raw)}")
    return np.frombuffer(raw, dtype=dtype).tolist()


def _binary_outputs(body: InferRequest) -> set[str] | bool:
    """The outputs to send as binary data: True for all, else the names asked."""
    every = body.parameters.pop("binary_data_output", False)
    if not isinstance(every, bool):
        raise APIError(400, "parameter binary_data_output must be true or false")
    asked = {o.name for o in body.outputs if o.parameters.get("binary_data") is True}
    return True if every else asked


def _answer(payload: dict, binary: set[str] | bool) -> Response:
    """``payload``'s outputs hold ``data`` as a numpy array or a list of strings; each goes
    out as JSON, or as raw little-endian bytes after the JSON header (BYTES: each element's
    length as a 4-byte integer, then the element)."""
    blobs = []
    for out in payload["outputs"]:
        data = out["data"]
        if binary is True or out["name"] in binary:
            if isinstance(data, np.ndarray):
                raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
            else:
                raw = b"".join(len(b).to_bytes(4, "little") + b
                               for b in (str(x).encode() for x in data))
            del out["data"]
            out["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif isinstance(data, np.ndarray):
            out["data"] = data.ravel().tolist()  # one C call, not a Python loop per float
    header = json.dumps(payload).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def _audio(body: InferRequest, rows: bool, default_rate: int = 16000
           ) -> tuple[np.ndarray, int]:
    """The request's only input, ``audio`` (mono, in [-1, 1]): FP32 ``[N, samples]`` (or
    ``[samples]``, one) when ``rows``, else one audio, ``[samples]`` or ``[1, samples]``;
    and its ``sample_rate`` parameter. Returns ``(N, samples)`` float32 and the rate."""
    shape = "[N, samples]" if rows else "[samples]"
    if len(body.inputs) != 1 or body.inputs[0].name != "audio":
        raise APIError(400, f"expected exactly one input, named audio (FP32 {shape}, mono, "
                            "with a sample_rate parameter)")
    t = body.inputs[0]
    if t.datatype != "FP32" or len(t.shape) not in (1, 2) or any(d < 1 for d in t.shape) \
            or (not rows and len(t.shape) == 2 and t.shape[0] != 1) \
            or len(t.data) != int(np.prod(t.shape)):
        raise APIError(400, f"audio must be FP32 {shape} with its values; got "
                            f"{t.datatype} {t.shape} holding {len(t.data)} values", "audio")
    rate = body.parameters.get("sample_rate", default_rate)
    if type(rate) is not int or not 0 < rate <= 384000:
        raise APIError(400, "parameter sample_rate must be an integer in 1..384000 (Hz)",
                       "sample_rate")
    try:
        return np.asarray(t.data, dtype=np.float32).reshape(-1, t.shape[-1]), rate
    except (TypeError, ValueError):
        raise APIError(400, "audio: its data are not all numbers", "audio") from None


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
    """The pipeline ``name`` if this caller may use it and every model its steps call."""
    pipe = request.app.state.host.pipelines.get(name)
    if pipe is None or not who.may_use(name):
        return None
    host = request.app.state.host
    for model in pipe.models():
        dep = host.deployments.get(model)
        if dep is not None and not who.may_use(model, dep.config.tenants):
            return None
    return pipe


class _Ops:
    """A pipeline's steps through the same admission as direct requests, as the caller."""

    def __init__(self, request: Request, who: Principal) -> None:
        self.request, self.who = request, who

    async def embed(self, model: str, texts: list[str]) -> np.ndarray:
        dep = deployment(self.request, model, self.who)
        ids = [await in_pool(self.request, encode, dep, t) for t in texts]
        return np.stack(await embed(self.request, dep, ids, truncate=False))

    async def score(self, model: str, dense: np.ndarray, values: np.ndarray,
                    lengths: np.ndarray) -> np.ndarray:
        dep = deployment(self.request, model, self.who)
        if dep.kind != "recommender":
            raise APIError(400, f"model `{model}` is of kind {dep.kind}, not a recommender")
        return await score(self.request, dep, dense, values, lengths)

    async def transcribe(self, model: str, audio: np.ndarray, rate: int,
                         language: str | None, max_tokens: int | None) -> str:
        dep = speech_model(deployment(self.request, model, self.who))
        return (await transcribe(self.request, dep, self.who, audio, rate, language,
                                 max_tokens=max_tokens)).text

    async def generate(self, model: str, prompt: str, max_tokens: int) -> str:
        dep = generative(deployment(self.request, model, self.who))
        ids = await in_pool(self.request, encode, dep, prompt)
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        gen = await start_generation(self.request, dep, ids, params,
                                     f"pipe-{uuid.uuid4().hex}", prompt, self.who)
        return (await finish(self.request, gen)).outputs[0].text


async def _infer_pipeline(request: Request, pipe, body: InferRequest, who: Principal) -> dict:
    """A pipeline: text_input in (``audio`` FP32 [samples] and a ``sample_rate`` parameter
    for one that transcribes); text_output (the last step's) and every labelled or
    generated step's output by name. A step's refusal keeps its status (400, 404, 429, 503),
    its message naming the step."""
    limits = request.app.state.limits
    if pipe.config.takes_audio:
        samples, rate = _audio(body, rows=False)
        given = (samples[0], rate)
    else:
        given = _single_text(body)
    try:
        ctx = await within(pipe.run(given, _Ops(request, who)),
                           time.monotonic() + limits.request_timeout_s)
    except PipelineError as e:
        cause = http_error(e.__cause__ or e)
        raise APIError(cause.status, f"pipeline {pipe.name!r}: {e}", cause.param, cause.code,
                       cause.headers) from None
    except TimeoutError:
        raise http_error(TimeoutError()) from None
    outputs = [{"name": "text_output", "datatype": "BYTES", "shape": [1],
                "data": [str(ctx["output"])]}]
    outputs += [{"name": name, "datatype": "BYTES", "shape": [1], "data": [text]}
                for name, text in pipe.outputs(ctx)]
    return {"model_name": pipe.name, "model_version": "1", "id": body.id or "",
            "outputs": outputs}


async def _infer_encoder(request: Request, dep, body: InferRequest) -> dict:
    """Encoders: ``text_input`` (BYTES, [N]) or ``input_ids`` (INT32/INT64, [N, T]) in,
    ``embedding`` (FP32, [N, H]) out (logits for a classifier), its data a float32 array
    that ``_answer`` renders."""
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
        ids = [await in_pool(request, encode, dep, x) for x in t.data]
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
    truncate = body.parameters.get("truncate", False)
    if not isinstance(truncate, bool):
        raise APIError(400, "parameter truncate must be true or false")
    vectors = np.stack(await embed(request, dep, ids, truncate, param=t.name))
    return {"model_name": dep.config.name, "model_version": "1", "id": body.id or "",
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": list(vectors.shape),
                         "data": vectors.astype(np.float32)}]}


_REC_INPUTS = {"dense": ("FP32", "FP64", "FP16"), "sparse_values": ("INT64", "INT32"),
               "sparse_lengths": ("INT32", "INT64")}


async def _infer_recommender(request: Request, dep, body: InferRequest) -> dict:
    """DLRM: ``dense`` FP32 [N, 13], ``sparse_values`` INT64 [total] and ``sparse_lengths``
    INT32 [26, N] (TorchRec's KeyedJaggedTensor layout) in, ``score`` FP32 [N] out, through
    the replica's dynamic batcher. Each input is checked before it queues, so a bad request
    is a 400 naming the input (and the feature) and never shares a batch."""
    given = {t.name: t for t in body.inputs}
    if sorted(given) != sorted(_REC_INPUTS) or len(body.inputs) != len(_REC_INPUTS):
        raise APIError(400, f"expected the inputs {sorted(_REC_INPUTS)}, got "
                            f"{[t.name for t in body.inputs]}")
    arrays = {}
    for name, kinds in _REC_INPUTS.items():
        t = given[name]
        if t.datatype not in kinds:
            raise APIError(400, f"input {name!r}: datatype {t.datatype} is not one of "
                                f"{list(kinds)}", name)
        if any(d < 0 for d in t.shape) or len(t.data) != int(np.prod(t.shape)):
            raise APIError(400, f"input {name!r} has shape {t.shape} but holds "
                                f"{len(t.data)} values", name)
        try:
            arrays[name] = np.asarray(t.data, dtype=np.float32 if kinds[0] == "FP32"
                                      else np.int64).reshape(t.shape)
        except (TypeError, ValueError, OverflowError):
            raise APIError(400, f"input {name!r}: its data are not all numbers", name) from None
    scores = await score(request, dep, arrays["dense"], arrays["sparse_values"],
                         arrays["sparse_lengths"])
    return {"model_name": dep.config.name, "model_version": "1", "id": body.id or "",
            "outputs": [{"name": "score", "datatype": "FP32", "shape": [len(scores)],
                         "data": np.asarray(scores, np.float32)}]}


async def _infer_speech(request: Request, dep, body: InferRequest, who: Principal) -> dict:
    """Whisper: ``audio`` FP32 ``[N, samples]`` (mono, in [-1, 1]; ``[samples]`` for one) at
    the request's ``sample_rate`` parameter (default: the model's, 16000), optional
    ``language`` and ``task`` parameters; ``text`` BYTES ``[N]`` out, each row transcribed as
    a request of its own."""
    rows, rate = _audio(body, rows=True, default_rate=dep.speech.mel.rate)
    language, task = body.parameters.get("language"), body.parameters.get("task", "transcribe")
    if not (language is None or isinstance(language, str)) or not isinstance(task, str):
        raise APIError(400, "parameters language and task must be strings", "language")
    try:  # a row refused or failed ends the others (their generations are aborted)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(transcribe(request, dep, who, row, rate, language, task))
                     for row in rows]
    except* APIError as errors:
        raise errors.exceptions[0] from None
    outs = [task.result() for task in tasks]
    return {"model_name": dep.config.name, "model_version": "1", "id": body.id or "",
            "outputs": [{"name": "text", "datatype": "BYTES", "shape": [len(outs)],
                         "data": [o.text for o in outs]}]}


async def _complete(request: Request, name: str, who: Principal, prompt: str,
                    parameters: dict) -> str:
    dep = generative(deployment(request, name, who))
    unknown = sorted(set(parameters) - _PARAMS)
    if unknown:
        raise APIError(400, f"unknown parameter {unknown[0]!r}; known: {sorted(_PARAMS)}")
    try:
        params = SamplingParams(**parameters)
    except InvalidRequest as e:
        raise APIError(400, f"parameter {e}", e.param) from None
    ids = await in_pool(request, encode, dep, prompt)
    gen = await start_generation(request, dep, ids, params, f"v2-{uuid.uuid4().hex}", prompt,
                                 who, "text_input")
    return (await finish(request, gen)).outputs[0].text
