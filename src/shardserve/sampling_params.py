"""Per-request sampling parameters, validated on construction (errors name the field)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Completions to generate for the prompt; they share its cached blocks."""
    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 is greedy; higher flattens the distribution."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 = all."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose mass reaches p; in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; in [0, 1]."""
    repetition_penalty: float = 1.0
    """Divide positive logits (multiply negative ones) of tokens seen in prompt or output; > 0."""
    presence_penalty: float = 0.0
    """Subtract from the logit of every token already generated; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtract this times the count of each token already generated; in [-2, 2]."""
    seed: int | None = None
    """Makes this request's sampling reproducible whatever else is batched with it."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the output; the text stops before the match."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end the output (the token is kept in token_ids)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    logprobs: int | None = None
    """Return the log-probabilities of the sampled token and of the top-k tokens per step."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "an integer >= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, ">= 0 (0 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int)
                                                   and 0 <= self.logprobs <= 20), "in 0..20"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

    def to_wire(self, seed: int | None = None) -> dict:
        """What the worker's sampler needs, as plain data (``seed`` overrides, for n > 1)."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty,
                "seed": self.seed if seed is None else seed,
                "logprobs": -1 if self.logprobs is None else self.logprobs}
