"""Per-request sampling parameters, validated on construction (errors name the field)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 is greedy; higher flattens the distribution."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose mass reaches p; in (0, 1]."""
    seed: int | None = None
    """Makes this request's sampling reproducible whatever else is batched with it."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end the output (included in it, as vLLM does)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def to_wire(self) -> dict:
        """The fields the worker's sampler needs, as plain data."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "seed": self.seed}
