"""One request's outputs on the consumer's side: the engine's per-step deltas in, the
``RequestOutput``s a caller sees out, text decoded incrementally here.

Three kinds of output, as vLLM's ``RequestOutputKind``:

- ``FINAL``: one output, when the request has finished (non-streaming APIs, ``LLM``);
- ``DELTA``: what is new since the last output: only completions that moved, with their new
  tokens, text and logprobs, and a finish reason once (streaming APIs). While a completion
  runs, text that could still turn out to be the start of a stop string is held back, so no
  streamed text is ever taken back;
- ``CUMULATIVE``: everything so far, every time (copies grow with the output: tests, tools).

Several deltas may be merged into one output when the consumer falls behind the engine.
"""

from __future__ import annotations

import enum

from shardserve.engine.core_messages import RequestDelta
from shardserve.engine.detokenizer import Detokenizer
from shardserve.outputs import CompletionOutput, RequestOutput
from shardserve.sampling_params import SamplingParams


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL = "final"


class _Completion:
    def __init__(self, index: int, tokenizer, params: SamplingParams) -> None:
        self.index = index
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None \
            else None
        self.detok = Detokenizer(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.finish_reason: str | None = None
        self.stop_text_len: int | None = None
        self.sent_tokens = self.sent_text = 0  # what DELTA outputs have carried
        self.sent_finish = False

    def text(self, hold: int = 0) -> str:
        if self.detok is None:
            return ""
        text = self.detok.text
        if self.stop_text_len is not None:
            return text[:self.stop_text_len]
        if self.finish_reason is None and hold:
            return text[:max(0, len(text) - hold)]
        return text


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, tokenizer=None,
                 kind: OutputKind = OutputKind.FINAL) -> None:
        self.request_id, self.prompt, self.prompt_token_ids = request_id, prompt, prompt_token_ids
        self.kind = kind
        self.completions = [_Completion(i, tokenizer, params) for i in range(params.n)]
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.finished = False
        self.num_cached_tokens = 0
        self.error: str | None = None
        self._moved: set[int] = set()  # completions changed since the last output

    def update(self, delta: RequestDelta) -> None:
        for d in delta.seqs:
            c = self.completions[d.index]
            if c.detok is not None:
                c.detok.push(d.token_ids)
            c.token_ids.extend(d.token_ids)
            if c.logprobs is not None and d.logprobs:
                c.logprobs.extend(d.logprobs)
            if d.finish_reason is not None and c.finish_reason is None:
                c.finish_reason, c.stop_text_len = d.finish_reason, d.stop_text_len
                if c.detok is not None and d.finish_reason != "error":
                    c.detok.finish()
            self._moved.add(d.index)
        self.finished = self.finished or delta.finished
        self.num_cached_tokens = delta.num_cached_tokens
        self.error = self.error or delta.error

    def output(self) -> RequestOutput | None:
        """The output to hand the consumer now, or None when its kind has nothing to show."""
        if self.kind is OutputKind.FINAL and not self.finished:
            return None
        if self.kind is OutputKind.DELTA:
            outs = [self._delta(self.completions[i]) for i in sorted(self._moved)]
            outs = [o for o in outs if o is not None]
        else:
            outs = [CompletionOutput(c.index, c.text(), list(c.token_ids), c.finish_reason,
                                     list(c.logprobs) if c.logprobs is not None else None)
                    for c in self.completions]
        self._moved.clear()
        if not outs and not self.finished:
            return None
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs,
                             self.finished, self.num_cached_tokens, self.error)

    def _delta(self, c: _Completion) -> CompletionOutput | None:
        new_tokens = c.token_ids[c.sent_tokens:]
        report_finish = c.finish_reason is not None and not c.sent_finish
        if not new_tokens and not report_finish:
            return None
        text = c.text(self.hold)
        out = CompletionOutput(c.index, text[c.sent_text:], new_tokens,
                               c.finish_reason if report_finish else None,
                               c.logprobs[c.sent_tokens:] if c.logprobs is not None else None)
        c.sent_tokens, c.sent_text = len(c.token_ids), max(c.sent_text, len(text))
        c.sent_finish = c.sent_finish or report_finish
        return out
