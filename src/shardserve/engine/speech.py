"""A speech model's requests: audio in, what the engine takes out.

``SpeechInput`` reads a Whisper folder's ``preprocessor_config.json`` (the log-mel front end)
and ``generation_config.json`` (its language and task tokens) and turns a request into the
engine's inputs: a ``Clip``, the audio resampled to the model's rate and cut into windows of
at most ``chunk_length`` seconds (30 for Whisper) at its quietest moments, with each window's
log-mel features; and the forced start tokens, ``<|startoftranscript|>``, the language, the
task and ``<|notimestamps|>``, as transformers' Whisper ``generate`` forces them. Each window
is transcribed as a request of its own and the texts joined, as vLLM does with long audio.

A multilingual model given no language detects it as transformers' ``detect_language``
does, in the request itself (``detecting``): from ``<|startoftranscript|>`` over the first
window, its first generated token is restricted to the language tokens, the task and
``<|notimestamps|>`` follow forced, then the transcription: one encoder pass, as with a
language given. A long audio's other windows are given the language the first found.

Bad audio, a language or task the model does not have, or audio longer than the caller's
limit raise ``InvalidRequest`` naming the field and what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardserve.audio import ACCEPTED, AudioError, LogMel, decode_wav, resample, split
from shardserve.engine.errors import InvalidRequest
from shardserve.outputs import CompletionOutput
from shardserve.planner.specs import WhisperSpec
from shardserve.sampling_params import SamplingParams

TASKS = ("transcribe", "translate")


@dataclass
class Clip:
    """One request's audio: its windows' log-mel features and where each lies (seconds)."""

    windows: list[np.ndarray]
    spans: list[tuple[float, float]]
    seconds: float


class SpeechInput:
    def __init__(self, folder: str | Path, spec: WhisperSpec) -> None:
        folder = Path(folder)
        if not (folder / "preprocessor_config.json").is_file():
            raise ValueError(f"{folder} lacks preprocessor_config.json (the audio front end's "
                             "settings a Whisper folder carries)")
        self.mel = LogMel.from_folder(folder)
        if self.mel.n_mels != spec.num_mel_bins or self.mel.frames != spec.encoder_frames:
            raise ValueError(f"{folder}: preprocessor_config.json gives {self.mel.n_mels} mels "
                             f"x {self.mel.frames} frames; the model takes "
                             f"{spec.num_mel_bins} x {spec.encoder_frames}")
        path = folder / "generation_config.json"
        gen = json.loads(path.read_text()) if path.is_file() else {}
        self.start = int(gen.get("decoder_start_token_id", spec.decoder_start_token_id))
        self.languages = {k.strip("<|>"): int(v) for k, v in
                          (gen.get("lang_to_id") or {}).items()}
        self.tasks = {k: int(v) for k, v in (gen.get("task_to_id") or {}).items()}
        self.multilingual = bool(gen.get("is_multilingual", bool(self.languages)))
        self.no_timestamps = gen.get("no_timestamps_token_id")
        self.window_seconds = self.mel.chunk_length

    @property
    def detects(self) -> bool:
        """Whether a request without a language has it detected (multilingual models)."""
        return self.multilingual and bool(self.languages)

    def detecting(self, params: SamplingParams, task: str = "transcribe"
                  ) -> tuple[list[int], SamplingParams]:
        """A request that finds its language as it starts, in its one encoder pass: the
        prompt is ``<|startoftranscript|>`` alone and the first generated tokens are the
        most likely language token (transformers' ``detect_language``), then the task's and
        ``<|notimestamps|>`` (forced), then the transcription ``params`` ask for; ``found``
        takes those first tokens off its output."""
        prefix = [sorted(self.languages.values()), [self.tasks[task]]]
        if self.no_timestamps is not None:
            prefix.append([int(self.no_timestamps)])
        return [self.start], dataclasses.replace(
            params, max_tokens=params.max_tokens + len(prefix), prefix_allowed_token_ids=prefix)

    def found(self, out: CompletionOutput, params: SamplingParams
              ) -> tuple[str, CompletionOutput]:
        """A ``detecting`` request's completion (its ``params``) as ``(language code, the
        completion after the start tokens it found)``."""
        n = len(params.prefix_allowed_token_ids or ())
        if len(out.token_ids) < n:
            raise ValueError("the request ended before its language was found")
        code = self.language_of(out.token_ids[0])
        rest = dataclasses.replace(out, token_ids=out.token_ids[n:], logprobs=None
                                   if out.logprobs is None else out.logprobs[n:])
        return code, rest

    def language_of(self, token: int) -> str:
        """The language code of a language token."""
        for code, tid in self.languages.items():
            if tid == token:
                return code
        raise ValueError(f"token {token} is not a language token of this model")

    def prompt(self, language: str | None = None, task: str = "transcribe") -> list[int]:
        """The forced start tokens. ``language`` (an ISO 639-1 code the model knows) defaults
        to English; an English-only model takes ``en`` or none, and only ``transcribe``."""
        ids = [self.start]
        if task not in TASKS:
            raise InvalidRequest(f"task must be one of {', '.join(TASKS)}, got {task!r}",
                                 "task")
        if self.multilingual:
            lang = (language or "en").lower()
            if lang not in self.languages:
                raise InvalidRequest(f"language {language!r} is not one this model knows; "
                                     f"known: {', '.join(sorted(self.languages))}", "language")
            if task not in self.tasks:
                raise InvalidRequest(f"task {task!r} is not one this model knows; known: "
                                     f"{', '.join(sorted(self.tasks))}", "task")
            ids += [self.languages[lang], self.tasks[task]]
        elif (language or "en").lower() != "en" or task != "transcribe":
            raise InvalidRequest("this model is English-only: language must be en and task "
                                 "transcribe", "language")
        if self.no_timestamps is not None:
            ids.append(int(self.no_timestamps))
        return ids

    def load(self, audio: bytes | np.ndarray, rate: int | None = None,
             max_seconds: float | None = None) -> Clip:
        """The ``Clip`` of a WAV file's bytes, or of mono samples in [-1, 1] at ``rate``;
        audio over ``max_seconds`` (None: no limit) is refused."""
        try:
            if isinstance(audio, bytes | bytearray | memoryview):
                samples, rate = decode_wav(bytes(audio))
            else:
                samples = np.asarray(audio, dtype=np.float32)
                if samples.ndim != 1:
                    raise AudioError(f"audio samples must be one mono channel, got shape "
                                     f"{list(samples.shape)}")
                if rate is None or rate <= 0:
                    raise AudioError("raw audio samples need their sample rate")
        except AudioError as e:
            raise InvalidRequest(str(e), "file") from None
        if len(samples) == 0:
            raise InvalidRequest(f"the audio holds no samples; send {ACCEPTED}", "file")
        if not np.isfinite(samples).all():
            raise InvalidRequest("the audio holds NaN or infinite samples", "file")
        seconds = len(samples) / rate
        if max_seconds is not None and seconds > max_seconds + 1e-6:
            raise InvalidRequest(f"the audio is {seconds:.1f} s long; this server transcribes "
                                 f"at most {max_seconds:g} s a request (--max-audio-seconds): "
                                 "cut it into pieces", "file")
        x = resample(samples, rate, self.mel.rate)
        spans = split(x, self.mel.rate, self.window_seconds)
        return Clip([self.mel(x[a:b]) for a, b in spans],
                    [(a / self.mel.rate, b / self.mel.rate) for a, b in spans], seconds)
