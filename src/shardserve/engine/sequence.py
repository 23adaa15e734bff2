"""A sequence: one request's prompt, its generated tokens, and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.sampling_params import SamplingParams


@dataclass
class Sequence:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, eos_ids: tuple[int, ...], max_len: int) -> None:
        """Add a sampled token and decide whether the sequence is done."""
        self.output_token_ids.append(token)
        p = self.params
        if (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= p.max_tokens or self.num_tokens >= max_len:
            self.finish_reason = "length"
