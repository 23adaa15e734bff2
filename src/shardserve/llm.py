"""The offline API: ``LLM(model=DIR, tensor_parallel_size=2).generate(prompts, params)``."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

from shardserve.config import (
    CacheConfig,
    DeviceConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.request_state import RequestState
from shardserve.engine.tokenizer import load_tokenizer
from shardserve.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
)
from shardserve.sampling_params import SamplingParams


def _take(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the entries of ``kwargs`` that are fields of dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)} - {"path"}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


class LLM:
    """A model sharded over ``tensor_parallel_size x pipeline_parallel_size`` devices,
    generating with continuous batching over a paged KV cache.

    ``devices`` defaults to one CPU device per rank (``cpu:{tp * pp}``). Any
    other keyword is a field of ``ModelConfig`` (``dtype``, ``max_model_len``), ``DeviceConfig``
    (``device_memory``), ``CacheConfig`` (``block_size``, ``num_blocks``,
    ``enable_prefix_caching``) or ``SchedulerConfig`` (``max_num_seqs``,
    ``max_num_batched_tokens``), with the defaults and meanings documented there.
    """

    def __init__(self, model: str, tensor_parallel_size: int = 1, devices: str | None = None,
                 pipeline_parallel_size: int = 1, pipeline_split: str | None = None,
                 executor: str = "local", ray_address: str | None = None,
                 **kwargs: Any) -> None:
        parallel = ParallelConfig(tensor_parallel_size, pipeline_parallel_size, pipeline_split,
                                  executor, ray_address)
        kwargs["devices"] = devices or f"cpu:{parallel.world_size}"
        model_cfg, device, cache, sched = (
            _take(cls, kwargs) for cls in (ModelConfig, DeviceConfig, CacheConfig,
                                           SchedulerConfig))
        if kwargs:
            raise TypeError(f"LLM got unknown arguments {sorted(kwargs)}")
        self.model_config = ModelConfig(model, **model_cfg)
        self.tokenizer = load_tokenizer(self.model_config)
        if self.model_config.is_encoder:
            from shardserve.engine.encoder_engine import EncoderEngine

            self.engine = EncoderEngine(self.model_config, parallel, DeviceConfig(**device))
        else:
            self.engine = LLMEngine(self.model_config, parallel, DeviceConfig(**device),
                                    CacheConfig(**cache), SchedulerConfig(**sched),
                                    self.tokenizer)
        self._ids = itertools.count()

    def embed(self, prompts: str | list[str] | None = None,
              prompt_token_ids: list[list[int]] | None = None) -> list[EmbeddingRequestOutput]:
        """Encoders: one pooled vector per input (logits for a classifier), in order."""
        if not self.model_config.is_encoder:
            raise ValueError(f"{self.model_config.spec.architecture} is a generative model; "
                             "use generate()")
        token_lists, texts = self._inputs(prompts, prompt_token_ids)
        vectors = self.engine.encode(token_lists)
        return [EmbeddingRequestOutput(str(next(self._ids)), text, tokens,
                                       EmbeddingOutput(v.tolist()))
                for text, tokens, v in zip(texts, token_lists, vectors, strict=True)]

    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """One output per request, in request order."""
        if self.model_config.is_encoder:
            raise ValueError(f"{self.model_config.spec.architecture} is an encoder; use embed()")
        token_lists, texts = self._inputs(prompts, prompt_token_ids)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"got {len(params)} sampling_params for {len(token_lists)} prompts;"
                             " give one, or one per prompt")
        return self._run([(tokens, p, text, None)
                          for tokens, p, text in zip(token_lists, params, texts, strict=True)])

    def transcribe(self, audio: bytes | Any | list, language: str | None = None,
                   task: str = "transcribe", sampling_params: SamplingParams | None = None,
                   sampling_rate: int | None = None) -> list[RequestOutput]:
        """Speech models: one transcription per audio (WAV bytes, or mono float samples at
        ``sampling_rate``), in order. Audio longer than one window (30 s) is cut at quiet
        moments and its windows' transcriptions joined (tokens, logprobs and texts in order).
        Without ``language`` a multilingual model detects it from the first window (the
        language token is the output's ``prompt_token_ids[1]``). Greedy and up to the
        model's 448 tokens a window unless ``sampling_params`` say otherwise."""
        speech = self._speech
        prompt = speech.prompt(language, task)  # a bad language or task: refused before work
        clips = [speech.load(a, sampling_rate) for a in
                 (audio if isinstance(audio, list) else [audio])]
        params = sampling_params or SamplingParams(
            temperature=0.0, max_tokens=self.engine.max_len - len(prompt))
        heads: list[RequestOutput | None] = [None] * len(clips)  # first windows, if detecting
        prompts: list[list[int] | None] = [prompt] * len(clips)
        if language is None and speech.detects:  # each clip's first window finds it
            detect = speech.detecting(params, task)
            for i, out in enumerate(self._run([(*detect, None, c.windows[0]) for c in clips])):
                heads[i], prompts[i] = out, None  # failed: its clip ends here
                if out.error is None:
                    code, rest = speech.found(out.outputs[0], detect[1])
                    prompts[i] = speech.prompt(code, task)
                    heads[i] = dataclasses.replace(out, prompt_token_ids=prompts[i],
                                                   outputs=[rest])
        todo = [(i, w) for i, c in enumerate(clips) if prompts[i] is not None
                for w in c.windows[heads[i] is not None:]]
        windows = [[] if h is None else [h] for h in heads]
        for (i, _), out in zip(todo, self._run([(prompts[i], params, None, w)
                                                for i, w in todo]), strict=True):
            windows[i].append(out)
        return [_joined(w) for w in windows]

    @functools.cached_property
    def _speech(self):
        """A speech model's front end (``engine/speech.SpeechInput``)."""
        from shardserve.engine.speech import SpeechInput

        if not self.engine.speech:
            raise ValueError(f"{self.model_config.spec.architecture} is not a speech model; "
                             "use generate()")
        return SpeechInput(self.model_config.path, self.model_config.spec)

    def _run(self, requests: list[tuple]) -> list[RequestOutput]:
        """Generate ``(prompt ids, params, prompt text, audio features)`` to the end, outputs
        in request order; nothing of a failed call stays queued."""
        states: dict[str, RequestState] = {}
        try:
            for tokens, params, text, features in requests:
                rid = str(next(self._ids))
                states[rid] = RequestState(rid, text, tokens, params, self.tokenizer)
                self.engine.add_request(rid, tokens, params, text, features=features)
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    states[delta.request_id].update(delta)
        except BaseException:
            for rid in states:
                self.engine.abort_request(rid)
            raise
        return [state.output() for state in states.values()]

    def _inputs(self, prompts, prompt_token_ids) -> tuple[list[list[int]], list[str | None]]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give either prompts or prompt_token_ids")
        if prompt_token_ids is not None:
            return [list(t) for t in prompt_token_ids], [None] * len(prompt_token_ids)
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.tokenizer is None:
            raise ValueError(f"{self.model_config.path} has no tokenizer.json; pass "
                             "prompt_token_ids instead of text prompts")
        return self.tokenizer.encode_batch(list(prompts)), list(prompts)

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _joined(windows: list[RequestOutput]) -> RequestOutput:
    """One audio's windows as one output: the first window's request and prompt, every
    window's tokens, logprobs and text in order, the last window's finish reason."""
    first, outs = windows[0], [w.outputs[0] for w in windows]
    if len(windows) == 1:
        return first
    logprobs = None if any(o.logprobs is None for o in outs) else \
        [lp for o in outs for lp in o.logprobs]
    text = " ".join(t for t in (o.text.strip() for o in outs) if t)
    return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids,
                         [CompletionOutput(0, text, [t for o in outs for t in o.token_ids],
                                           outs[-1].finish_reason, logprobs)],
                         finished=True, error=next((w.error for w in windows if w.error),
                                                   None))
