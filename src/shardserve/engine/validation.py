"""Admission checks that depend on the model: token ids within the vocabulary, lengths within
the context, features the model folder lacks. One home for these rules: the offline API, the
engines and the HTTP routes all call them, so a request either is refused here with an
``InvalidRequest`` naming its field, or is one the step can run.

(Model-independent ranges live in ``SamplingParams`` itself.)
"""

from __future__ import annotations

from collections.abc import Sequence

from shardserve.engine.errors import InvalidRequest
from shardserve.sampling_params import SamplingParams


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str = "prompt",
                    what: str = "the prompt") -> None:
    """Every id an integer in ``0..vocab_size-1``."""
    if not ids:
        raise InvalidRequest(f"{what} is empty: give at least one token", param)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidRequest(f"{what} must be a list of integer token ids", param)
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise InvalidRequest(f"{what} has token ids outside the model's vocabulary: ids must "
                             f"be in 0..{vocab_size - 1}", param)


def check_generation(ids: Sequence[int], params: SamplingParams, vocab_size: int,
                     context_len: int, has_tokenizer: bool, param: str = "prompt") -> None:
    """A generation request: the prompt, and the sampling fields the model bounds."""
    check_token_ids(ids, vocab_size, param)
    if len(ids) >= context_len:
        raise InvalidRequest(f"the prompt has {len(ids)} tokens; the model's context is "
                             f"{context_len} tokens and at least one must be left to generate",
                             param)
    if params.max_tokens > context_len:
        raise InvalidRequest(f"max_tokens may be at most the model's context, {context_len}",
                             "max_tokens")
    if params.top_k > vocab_size:
        raise InvalidRequest(f"top_k must be -1, 0 or in 1..{vocab_size} (the vocabulary)",
                             "top_k")
    if params.logprobs is not None and params.logprobs > vocab_size:
        raise InvalidRequest(f"logprobs must be at most the vocabulary, {vocab_size}",
                             "logprobs")
    if params.stop_token_ids and max(params.stop_token_ids) >= vocab_size:
        raise InvalidRequest(f"stop_token_ids must be in 0..{vocab_size - 1}",
                             "stop_token_ids")
    if params.stop and not has_tokenizer:
        raise InvalidRequest("stop strings need the model's tokenizer.json, which this model "
                             "lacks; use stop_token_ids", "stop")


def check_inputs(inputs: Sequence[Sequence[int]], vocab_size: int, context_len: int,
                 truncate: bool = False, param: str = "input") -> list[list[int]]:
    """Encoder inputs: each a non-empty list of ids in the vocabulary, at most the context
    long (cut to it when ``truncate``). Returns the lists as the model will see them."""
    out = []
    for i, ids in enumerate(inputs):
        check_token_ids(ids, vocab_size, param, f"input {i}")
        if len(ids) > context_len and not truncate:
            raise InvalidRequest(f"input {i} has {len(ids)} tokens; the model takes at most "
                                 f"{context_len} (send \"truncate\": true to cut it)", param)
        out.append(list(ids[:context_len]))
    return out
