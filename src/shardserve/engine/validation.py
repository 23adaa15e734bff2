"""Admission checks that depend on the model: token ids within the vocabulary, lengths within
the context, features the model folder lacks. One home for these rules: the offline API, the
engines and the HTTP routes all call them, so a request either is refused here with an
``InvalidRequest`` naming its field, or is one the step can run.

(Model-independent ranges live in ``SamplingParams`` itself.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shardserve.engine.errors import InvalidRequest
from shardserve.planner.specs import DLRMSpec, WhisperSpec
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
    for name in ("allowed_token_ids", "prefix_allowed_token_ids"):
        lists = getattr(params, name) or []
        lists = [lists] if name == "allowed_token_ids" and lists else lists
        if any(max(ids) >= vocab_size for ids in lists):
            raise InvalidRequest(f"{name} must be in 0..{vocab_size - 1}", name)
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


Request = tuple[np.ndarray, np.ndarray, np.ndarray]  # a recommender's: dense, values, lengths


def check_request(spec: DLRMSpec, dense: np.ndarray, values: np.ndarray,
                  lengths: np.ndarray) -> Request:
    """A recommender's request (TorchRec's KeyedJaggedTensor layout, see
    ``engine/recommender.py``) as the workers take it, or ``InvalidRequest`` naming the input
    and the feature at fault."""
    f, d = spec.num_tables, spec.dense_in_features
    dense, values, lengths = np.asarray(dense), np.asarray(values), np.asarray(lengths)
    if dense.ndim != 2 or dense.shape[1] != d or dense.shape[0] < 1:
        raise InvalidRequest(f"dense: expected FP32 [N, {d}] with N >= 1, got shape "
                             f"{list(dense.shape)}", "dense")
    n = dense.shape[0]
    if lengths.shape != (f, n):
        raise InvalidRequest(f"sparse_lengths: expected INT32 [{f}, {n}] (a row per sparse "
                             f"feature, a column per sample of dense), got shape "
                             f"{list(lengths.shape)}", "sparse_lengths")
    if values.ndim != 1:
        raise InvalidRequest(f"sparse_values: expected INT64 [total], got shape "
                             f"{list(values.shape)}", "sparse_values")
    for name, a, kinds, what in (("dense", dense, "fiu", "FP32"),
                                  ("sparse_values", values, "iu", "integer"),
                                  ("sparse_lengths", lengths, "iu", "integer")):
        if a.dtype.kind not in kinds:
            raise InvalidRequest(f"{name}: expected {what} data, got {a.dtype}", name)
    if not np.isfinite(dense).all():
        raise InvalidRequest("dense: NaN or infinite values", "dense")
    if (lengths < 0).any():
        t = int(np.argwhere(lengths < 0)[0][0])
        raise InvalidRequest(f"sparse_lengths: feature cat_{t} has a negative length",
                             "sparse_lengths")
    per_feature = lengths.sum(1)
    if int(per_feature.sum()) != len(values):
        raise InvalidRequest(f"sparse_values: {len(values)} ids, but sparse_lengths sum to "
                             f"{int(per_feature.sum())}", "sparse_values")
    rows = np.repeat(np.asarray(spec.num_embeddings), per_feature)  # each id's table size
    bad = (values < 0) | (values >= rows)
    if bad.any():
        at = int(np.argmax(bad))
        t = int(np.searchsorted(np.cumsum(per_feature), at, side="right"))
        raise InvalidRequest(f"sparse_values: feature cat_{t} has id {int(values[at])}, "
                             f"outside its table's rows 0..{spec.num_embeddings[t] - 1}",
                             "sparse_values")
    return (dense.astype(np.float32, copy=False), values.astype(np.int64, copy=False),
            lengths.astype(np.int64, copy=False))


def check_features(spec: WhisperSpec, features: np.ndarray | None) -> np.ndarray:
    """A speech request's log-mel features: float32 ``(num_mel_bins, frames)`` of one
    window, finite (``audio.LogMel`` makes them from a file)."""
    want = (spec.num_mel_bins, spec.encoder_frames)
    if features is None:
        raise InvalidRequest(f"{spec.architecture} transcribes audio: send a file", "file")
    features = np.asarray(features)
    if features.shape != want or features.dtype.kind != "f":
        raise InvalidRequest(f"audio features must be float [{want[0]}, {want[1]}] (one "
                             f"window), got {features.dtype} {list(features.shape)}", "file")
    if not np.isfinite(features).all():
        raise InvalidRequest("audio features hold NaN or infinite values", "file")
    return np.ascontiguousarray(features, dtype=np.float32)

