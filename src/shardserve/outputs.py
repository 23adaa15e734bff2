"""Results shaped like vLLM's, so code written against it reads ours unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length", "abort",
    # "error" (see RequestOutput.error)
    logprobs: list[dict[int, float]] | None = None  # per token: sampled and top-k log-probs


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when the request failed; the message is safe to show


@dataclass
class EmbeddingOutput:
    embedding: list[float]  # the pooled vector (a classifier's logits)


@dataclass
class EmbeddingRequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
