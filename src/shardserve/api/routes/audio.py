"""OpenAI's audio endpoints for speech models: ``/v1/audio/transcriptions`` and
``/v1/audio/translations`` (multipart form: ``file``, ``model``, ``language``,
``response_format`` json / text / verbose_json / srt / vtt, ``temperature``; and, beyond
OpenAI's fields, ``max_tokens``).

A file is decoded, resampled and turned into log-mel features on the server's CPU pool (off
the event loop), then generated like any request: admitted, queued, answered once. Audio
longer than one window (30 s for Whisper) is cut at quiet moments into windows transcribed
side by side (at most ``max_num_seqs`` of one request at a time) and joined; each window is a
segment of ``verbose_json`` and a cue of ``srt`` / ``vtt``. Without ``language`` a
multilingual model detects it from the first window, in that window's own request. Audio
over ``max_audio_seconds`` is a 400 naming the limit, a body over ``max_audio_bytes`` a 413
(the request guard), a file that is not WAV a 400 naming the formats accepted; a window
refused or failed fails the request (the others are aborted).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from starlette.datastructures import UploadFile

from shardserve.api.admission import finish, http_error, in_pool, start_generation
from shardserve.api.auth import Principal, principal
from shardserve.api.errors import APIError
from shardserve.api.routes.openai import deployment
from shardserve.engine.errors import InvalidRequest
from shardserve.outputs import CompletionOutput
from shardserve.sampling_params import SamplingParams

router = APIRouter()
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")


@dataclass
class Segment:
    """One window's transcription and where the window lies in the audio."""

    start: float  # seconds
    end: float
    text: str
    tokens: list[int]
    avg_logprob: float | None


@dataclass
class Transcript:
    segments: list[Segment]
    seconds: float  # of audio
    language: str
    task: str

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text)


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
    frames = dep.speech.mel.rate / dep.speech.mel.hop_length  # a second's log-mel frames
    return {"task": out.task, "language": out.language, "duration": round(out.seconds, 3),
            "text": out.text, "usage": usage,
            "segments": [{"id": i, "seek": round(s.start * frames), "start": round(s.start, 3),
                          "end": round(s.end, 3), "text": s.text, "tokens": s.tokens,
                          "temperature": temperature, "avg_logprob": s.avg_logprob}
                         for i, s in enumerate(out.segments)]}


def speech_model(dep):
    if dep.speech is None:
        raise APIError(400, f"model `{dep.config.name}` is of kind {dep.kind} "
                            f"({dep.model.spec.architecture}); transcriptions come from a "
                            "speech model (Whisper)", "model")
    return dep


async def transcribe(request: Request, dep, who: Principal, audio, rate: int | None,
                     language: str | None, task: str = "transcribe",
                     temperature: float = 0.0, max_tokens: int | None = None) -> Transcript:
    """Audio (WAV bytes, or mono samples at ``rate``) through a speech model: the front end
    on the CPU pool, then each window an admitted generation of at most ``max_tokens``
    (default: as many as the model's decoder holds), at most ``max_num_seqs`` at a time.
    Without a language the first window finds it as it starts (``SpeechInput.detecting``)
    and the others, given it, start then. Refusals raise ``APIError``."""
    speech = dep.speech
    try:
        prompt = speech.prompt(language, task)  # a bad language or task: refused now
        clip = await in_pool(request, speech.load, audio, rate,
                             request.app.state.limits.max_audio_seconds)
        most = dep.model.context_len - len(prompt)
        params = SamplingParams(temperature=temperature, logprobs=0,
                                max_tokens=min(max_tokens or most, most))
    except InvalidRequest as e:
        raise http_error(e) from None
    lanes = asyncio.Semaphore(dep.config.max_num_seqs)  # this request's windows in flight
    found = asyncio.get_running_loop().create_future()  # the language code
    if language is None and speech.detects:
        async def first(features) -> Segment:
            detect_prompt, detect = speech.detecting(params, task)
            async with lanes:
                c = await _generate(request, dep, who, detect_prompt, detect, features,
                                    lambda token: found.set_result(speech.language_of(token)))
            return _segment(speech.found(c, detect)[1])
    else:
        found.set_result((language or "en").lower())
        first = None

    async def window(features) -> Segment:
        lang = await found
        async with lanes:
            return _segment(await _generate(request, dep, who, speech.prompt(lang, task),
                                            params, features))

    try:  # a window refused or failed ends the others (their generations are aborted)
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task((first if i == 0 and first else window)(w))
                     for i, w in enumerate(clip.windows)]
    except* APIError as errors:
        raise errors.exceptions[0] from None
    segments = [t.result() for t in tasks]
    for seg, (start, end) in zip(segments, clip.spans, strict=True):
        seg.start, seg.end = start, end
    return Transcript(segments, clip.seconds, found.result(), task)


def _segment(c: CompletionOutput) -> Segment:
    logps = [lp[t] for t, lp in zip(c.token_ids, c.logprobs or [], strict=False) if t in lp]
    return Segment(0.0, 0.0, c.text.strip(), list(c.token_ids),
                   sum(logps) / len(logps) if logps else None)


async def _generate(request: Request, dep, who: Principal, prompt: list[int],
                    params: SamplingParams, features,
                    first_token: Callable[[int], None] | None = None) -> CompletionOutput:
    """One window's completion; with ``first_token``, streamed, and that called with the
    first generated token as soon as it comes."""
    gen = await start_generation(request, dep, prompt, params, f"trsc-{uuid.uuid4().hex}",
                                 None, who, "file", stream=first_token is not None,
                                 features=features)
    if first_token is None:
        return (await finish(request, gen)).outputs[0]
    whole = CompletionOutput(0, "", [], None, [])

    def add(out) -> None:
        for c in out.outputs:
            if not whole.token_ids and c.token_ids:
                first_token(c.token_ids[0])
            whole.text += c.text
            whole.token_ids += c.token_ids
            whole.logprobs += c.logprobs or []
            whole.finish_reason = c.finish_reason or whole.finish_reason
    await finish(request, gen, add)
    return whole


def _subtitles(out: Transcript, fmt: str) -> str:
    """A cue per window (no timestamps are generated inside one)."""
    sep = "," if fmt == "srt" else "."

    def at(t: float) -> str:
        ms = round(t * 1000)
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}" \
               f"{ms % 1000:03d}"
    cues = [f"{at(s.start)} --> {at(s.end)}\n{s.text}\n" for s in out.segments]
    if fmt == "srt":
        return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues, 1))
    return "WEBVTT\n\n" + "\n".join(cues)
