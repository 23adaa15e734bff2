"""OpenAI's audio endpoints for speech models: ``/v1/audio/transcriptions`` and
``/v1/audio/translations`` (multipart form: ``file``, ``model``, ``language``,
``response_format`` json / text / verbose_json / srt / vtt, ``temperature``; and, beyond
OpenAI's fields, ``max_tokens``).

A file is decoded, resampled and turned into log-mel features on the server's CPU pool (off
the event loop), then generated like any request: admitted, queued, answered once. Audio over
one window (30 s for Whisper) is a 400 naming the limit, a body over ``max_audio_bytes`` a
413 (the request guard), a file that is not WAV a 400 naming the formats accepted.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from starlette.datastructures import UploadFile

from shardserve.api.admission import finish, http_error, in_pool, start_generation
from shardserve.api.auth import Principal, principal
from shardserve.api.errors import APIError
from shardserve.api.routes.openai import deployment
from shardserve.engine.errors import InvalidRequest
from shardserve.sampling_params import SamplingParams

router = APIRouter()
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


@dataclass
class Transcript:
    text: str
    seconds: float  # of audio
    language: str
    task: str
    tokens: list[int]
    avg_logprob: float | None


@router.post("/v1/audio/transcriptions")
async def transcriptions(request: Request, who: Principal = Depends(principal)):
    return await _audio(request, who, "transcribe")


@router.post("/v1/audio/translations")
async def translations(request: Request, who: Principal = Depends(principal)):
    return await _audio(request, who, "translate")


async def _audio(request: Request, who: Principal, task: str):
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as e:  # a malformed multipart body, too many parts
        raise APIError(400, f"the form could not be read: {e}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "send the audio as a file in the form field `file`", "file")
    model = form.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "the form field `model` names the speech model to use", "model")
    fmt = str(form.get("response_format") or "json")
    if fmt not in FORMATS:
        raise APIError(400, f"response_format must be one of {', '.join(FORMATS)}, got "
                            f"{fmt[:20]!r}", "response_format")
    try:
        temperature = float(str(form.get("temperature") or 0))
    except ValueError:
        raise APIError(400, "temperature must be a number in [0, 1]", "temperature") from None
    if not 0 <= temperature <= 1:
        raise APIError(400, "temperature must be a number in [0, 1]", "temperature")
    most = None  # a shardserve extension: at most this many tokens
    if form.get("max_tokens") is not None:
        try:
            most = int(str(form.get("max_tokens")))
        except ValueError:
            most = 0
        if most < 1:
            raise APIError(400, "max_tokens must be an integer >= 1", "max_tokens")
    language = form.get("language") if task == "transcribe" else None
    if language is not None and not isinstance(language, str):
        raise APIError(400, "language must be text: an ISO 639-1 code such as en", "language")
    dep = speech_model(deployment(request, model, who))
    data = await upload.read()
    out = await transcribe(request, dep, who, data, None, language or None, task,
                           temperature, most)
    if fmt == "text":
        return PlainTextResponse(out.text + "\n")
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(out, fmt), media_type="text/plain")
    usage = {"type": "duration", "seconds": math.ceil(out.seconds)}
    if fmt == "json":
        return {"text": out.text, "usage": usage}
    return {"task": out.task, "language": out.language, "duration": round(out.seconds, 3),
            "text": out.text, "usage": usage,
            "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": round(out.seconds, 3),
                          "text": out.text, "tokens": out.tokens, "temperature": temperature,
                          "avg_logprob": out.avg_logprob}]}


def speech_model(dep):
    if dep.speech is None:
        raise APIError(400, f"model `{dep.config.name}` is of kind {dep.kind} "
                            f"({dep.model.spec.architecture}); transcriptions come from a "
                            "speech model (Whisper)", "model")
    return dep


async def transcribe(request: Request, dep, who: Principal, audio, rate: int | None,
                     language: str | None, task: str = "transcribe",
                     temperature: float = 0.0, max_tokens: int | None = None) -> Transcript:
    """One window of audio (WAV bytes, or mono samples at ``rate``) through a speech model:
    the front end on the CPU pool, then an admitted generation of at most ``max_tokens``
    (default: as many as the model's decoder holds). Refusals raise ``APIError``."""
    speech = dep.speech
    try:
        prompt = speech.prompt(language, task)
        features, seconds = await in_pool(request, speech.load, audio, rate)
        most = dep.model.context_len - len(prompt)
        params = SamplingParams(temperature=temperature, logprobs=0,
                                max_tokens=min(max_tokens or most, most))
    except InvalidRequest as e:
        raise http_error(e) from None
    gen = await start_generation(request, dep, prompt, params, f"trsc-{uuid.uuid4().hex}",
                                 None, who, "file", features=features)
    final = await finish(request, gen)
    c = final.outputs[0]
    logps = [lp[t] for t, lp in zip(c.token_ids, c.logprobs or [], strict=False) if t in lp]
    return Transcript(c.text.strip(), seconds, (language or "en").lower(), task,
                      list(c.token_ids), sum(logps) / len(logps) if logps else None)


def _subtitles(out: Transcript, fmt: str) -> str:
    """One cue over the whole audio (no timestamps are generated)."""
    sep = "," if fmt == "srt" else "."

    def at(t: float) -> str:
        ms = round(t * 1000)
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}" \
               f"{ms % 1000:03d}"
    cue = f"{at(0.0)} --> {at(out.seconds)}\n{out.text}\n"
    return f"1\n{cue}" if fmt == "srt" else f"WEBVTT\n\n{cue}"
