"""Per-request sampling parameters, validated on construction: every field has a type and a
range, and an ``InvalidRequest`` names the field and what it accepts. The checks that depend
on the model (vocabulary, context, tokenizer) are in ``engine/validation.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

from shardserve.engine.errors import InvalidRequest

GREEDY_BELOW = 1e-5
"""A temperature below this samples greedily (as vLLM does): dividing logits by a tinier one
overflows to inf and turns the distribution into NaN."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP = 32  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_ALLOWED_TOKEN_IDS = 1 << 16
MAX_PREFIX_STEPS = 16
MAX_LOGPROBS = 20


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(ids: object) -> bool:
    return (isinstance(ids, list | tuple) and 0 < len(ids) <= MAX_ALLOWED_TOKEN_IDS
            and all(_int(t) and 0 <= t <= INT64_MAX for t in ids))


def _real(x: object, lo: float, hi: float) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            and lo <= x <= hi)


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Completions to generate for the prompt; they share its cached blocks."""
    max_tokens: int = 16
    """Most tokens to generate; at most the model's context."""
    temperature: float = 1.0
    """0 (or below 1e-5) is greedy; higher flattens the distribution. Finite, >= 0."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 or -1 = all, else 1..vocab size."""
    top_p: float = 1.0
    """Sample among the most likely tokens whose mass reaches p; in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; in [0, 1]."""
    repetition_penalty: float = 1.0
    """Divide positive logits (multiply negative ones) of tokens seen in prompt or output;
    in [0.01, 10]."""
    presence_penalty: float = 0.0
    """Subtract from the logit of every token already generated; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtract this times the count of each token already generated; in [-2, 2]."""
    seed: int | None = None
    """Makes this request's sampling reproducible whatever else is batched with it; a 64-bit
    signed integer (completion i of n uses seed + i, which must fit too)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the output; the text stops before the match (at most 32)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end the output (the token is kept in token_ids)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    logprobs: int | None = None
    """Return the log-probabilities of the sampled token and of the top-k tokens per step
    (k in 0..20)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    allowed_token_ids: list[int] | None = None
    """Sample only among these token ids (vLLM's field of the same name); None: all."""
    prefix_allowed_token_ids: list[list[int]] | None = None
    """The first generated tokens, decided greedily whatever the sampling: token i is the
    most likely of list i (one id forces it), as transformers forces decoder ids and
    detects Whisper's language; later tokens are sampled (from ``allowed_token_ids``, if
    given). At most 16 lists."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])
        for name, ok, what in self._checks():
            if not ok:
                raise InvalidRequest(f"{name} must be {what}, got {_show(getattr(self, name))}",
                                     name)

    def _checks(self):
        seed, n = self.seed, self.n
        stop, ids = self.stop, self.stop_token_ids
        return [
            ("n", _int(n) and n >= 1, "an integer >= 1"),
            ("max_tokens", _int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _real(self.temperature, 0, math.inf), "a finite number >= 0"),
            ("top_p", _real(self.top_p, 0, 1) and self.top_p > 0, "in (0, 1]"),
            ("top_k", _int(self.top_k) and self.top_k >= -1,
             "-1 or 0 (all tokens) or an integer >= 1"),
            ("min_p", _real(self.min_p, 0, 1), "in [0, 1]"),
            ("repetition_penalty", _real(self.repetition_penalty, 0.01, 10), "in [0.01, 10]"),
            ("presence_penalty", _real(self.presence_penalty, -2, 2), "in [-2, 2]"),
            ("frequency_penalty", _real(self.frequency_penalty, -2, 2), "in [-2, 2]"),
            ("seed", seed is None or (_int(seed) and _int(n) and seed >= INT64_MIN
                                      and seed + max(n, 1) - 1 <= INT64_MAX),
             f"an integer in [{INT64_MIN}, {INT64_MAX} - (n - 1)]"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs)
                                                   and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"an integer in 0..{MAX_LOGPROBS}"),
            ("stop", isinstance(stop, list | tuple) and len(stop) <= MAX_STOP
             and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop),
             f"at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters"),
            ("stop_token_ids", isinstance(ids, list | tuple) and len(ids) <= MAX_STOP_TOKEN_IDS
             and all(_int(t) and 0 <= t <= INT64_MAX for t in ids),
             f"at most {MAX_STOP_TOKEN_IDS} token ids >= 0"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
            ("skip_special_tokens", isinstance(self.skip_special_tokens, bool),
             "true or false"),
            ("allowed_token_ids", self.allowed_token_ids is None
             or _token_ids(self.allowed_token_ids),
             f"null or 1 to {MAX_ALLOWED_TOKEN_IDS} token ids >= 0"),
            ("prefix_allowed_token_ids", self.prefix_allowed_token_ids is None
             or (isinstance(self.prefix_allowed_token_ids, list | tuple)
                 and len(self.prefix_allowed_token_ids) <= MAX_PREFIX_STEPS
                 and all(_token_ids(ids) for ids in self.prefix_allowed_token_ids)),
             f"null or at most {MAX_PREFIX_STEPS} lists of 1 to {MAX_ALLOWED_TOKEN_IDS} token "
             "ids >= 0"),
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @cached_property
    def stop_token_set(self) -> frozenset[int]:
        """``stop_token_ids`` for an O(1) check per generated token."""
        return frozenset(self.stop_token_ids)

    def to_wire(self, seed: int | None = None) -> dict:
        """What the worker's sampler needs, as plain data (``seed`` overrides, for n > 1)."""
        return {"temperature": 0.0 if self.greedy else float(self.temperature),
                "top_k": max(self.top_k, 0), "top_p": float(self.top_p),
                "min_p": float(self.min_p),
                "repetition_penalty": float(self.repetition_penalty),
                "presence_penalty": float(self.presence_penalty),
                "frequency_penalty": float(self.frequency_penalty),
                "seed": self.seed if seed is None else seed,
                "logprobs": -1 if self.logprobs is None else self.logprobs,
                "allowed": None if self.allowed_token_ids is None
                else sorted(set(self.allowed_token_ids)),
                "prefix_allowed": None if self.prefix_allowed_token_ids is None
                else [sorted(set(ids)) for ids in self.prefix_allowed_token_ids]}


def _show(value: object) -> str:
    """A short rendering of a refused value (no echo of long client input)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
