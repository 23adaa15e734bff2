"""A sequence: one completion's tokens, how many of them are in the KV cache, and why it
stopped. A request with ``n`` > 1 has n sequences sharing one prompt."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from shardserve.engine.detokenizer import Detokenizer
from shardserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: str
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # arrival order, for first-come-first-served
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)  # not yet reported
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    num_ahead: int = 0  # tokens of batches in flight: computed once their output is back
    num_fed: int = 0  # tokens the workers sampled and feed themselves, not yet appended
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_text_len: int | None = None  # output text is cut here when a stop string matched
    detok: Detokenizer | None = None  # the output's text, kept only to match stop strings
    num_reported: int = 0  # output tokens already sent in a delta
    num_preemptions: int = 0
    num_cached_prompt: int = 0  # prompt tokens taken from the prefix cache
    cache_salt: str | None = None  # prefix-cache namespace (the tenant): no sharing across

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens_from(self, start: int) -> list[int]:
        """``token_ids[start:]`` without building the whole list (the per-step delta)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:]
        return self.prompt_token_ids[start:] + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def busy(self) -> bool:
        """A batch in flight holds it."""
        return self.num_ahead > 0

    def stops_at_fed(self, max_len: int) -> bool:
        """Whether the last token the workers feed themselves certainly ends the sequence
        (its length, whatever the token): nothing after it is worth scheduling."""
        return self.num_fed > 0 and self._at_length(max_len, self.num_fed)

    def _at_length(self, max_len: int, more: int = 0) -> bool:
        """max_tokens or the context reached, with ``more`` tokens still to append."""
        return (len(self.output_token_ids) + more >= self.params.max_tokens
                or self.num_tokens + more >= max_len)

    def check_stop(self, token: int, eos_ids: tuple[int, ...], max_len: int) -> None:
        """After appending ``token``: finish on EOS, a stop token, max_tokens or context."""
        p = self.params
        if (not p.ignore_eos and token in eos_ids) or token in p.stop_token_set:
            self.finish_reason = "stop"
        elif self._at_length(max_len):
            self.finish_reason = "length"
