"""Token sampling on the batch, in the worker.

Order of operations, per row: penalties on the logits (repetition over prompt and output,
presence and frequency over the output), then greedy rows take the argmax; the others divide
by their temperature, softmax, drop tokens below ``min_p`` x the top probability, keep the
top-k / top-p nucleus, and draw. A row with a seed draws from its own generator, so its tokens
do not depend on what else is in the batch. Log-probabilities are those of the model's raw
distribution (before penalties and temperature), as vLLM returns them by default.

A row whose logits or probabilities are not usable (NaN, or no mass left after filtering)
fails alone: it is listed in ``failed`` with the reason, its token is -1, and the other rows
are sampled as usual. One request's numbers never fail the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from shardserve.kernels import ops


@dataclass
class RowState:
    """What sampling one row needs: its parameters, RNG and token history."""

    params: dict  # SamplingParams.to_wire()
    generator: torch.Generator | None
    tokens: list[int]  # prompt + output so far
    prompt_len: int


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # (B,)
    logprobs: torch.Tensor | None = None  # (B,)
    top_ids: torch.Tensor | None = None  # (B, K)
    top_logprobs: torch.Tensor | None = None  # (B, K)
    failed: dict[int, str] = field(default_factory=dict)  # row -> why it has no token


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[RowState]) -> SampleResult:
        """logits: (B, V) -> one token per row (-1 for a row listed in ``failed``)."""
        logits = logits.float()
        result = SampleResult(torch.empty(len(rows), dtype=torch.long, device=logits.device))
        k = max(r.params["logprobs"] for r in rows)  # -1: no row asked
        logp = torch.log_softmax(logits, dim=-1) if k >= 0 else None
        for i, r in enumerate(rows):
            _apply_penalties(logits[i], r)
        # A row holds a NaN or an infinity iff its max or min is one (both propagate NaN):
        # reductions, where isfinite().all() is a pass writing a mask as large as logits. The
        # native kernel finds argmax, max and min in one pass.
        argmax, hi, lo = ops.row_argmax(logits) or (
            logits.argmax(dim=-1), logits.amax(dim=-1), logits.amin(dim=-1))
        # on B floats in Python: five tensor operations here cost ~0.1 ms a decode step, each
        # meeting caches the weights have just been streamed through
        extremes = zip(hi.tolist(), lo.tolist(), strict=True)
        result.failed.update((i, "the model's logits for this sequence are not finite")
                             for i, (h, low) in enumerate(extremes)
                             if not (math.isfinite(h) and math.isfinite(low)))
        greedy = [i for i, r in enumerate(rows) if r.params["temperature"] == 0]
        if len(greedy) == len(rows):
            result.token_ids = argmax
        elif greedy:
            result.token_ids[greedy] = argmax[greedy]
        sampled = [i for i, r in enumerate(rows)
                   if r.params["temperature"] > 0 and i not in result.failed]
        if sampled:
            whole = len(sampled) == len(rows)  # then no copy
            tokens, failed = _sample(logits if whole else logits[sampled],
                                     hi if whole else hi[sampled], [rows[i] for i in sampled])
            result.token_ids[sampled] = tokens
            result.failed.update((sampled[j], why) for j, why in failed.items())
        if result.failed:
            result.token_ids[list(result.failed)] = -1
        if logp is not None:
            result.logprobs = logp.gather(1, result.token_ids.clamp(min=0)[:, None])[:, 0]
            if k > 0:
                result.top_logprobs, result.top_ids = logp.topk(k, dim=-1)
        return result


def _apply_penalties(row: torch.Tensor, r: RowState) -> None:
    p = r.params
    if p["repetition_penalty"] != 1.0:
        seen = torch.tensor(sorted(set(r.tokens)), dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p["repetition_penalty"],
                                vals * p["repetition_penalty"])
    if p["presence_penalty"] or p["frequency_penalty"]:
        out = torch.tensor(r.tokens[r.prompt_len:], dtype=torch.long, device=row.device)
        if out.numel():
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
            row -= p["frequency_penalty"] * counts + p["presence_penalty"] * (counts > 0)


def _sample(logits: torch.Tensor, row_max: torch.Tensor, rows: list[RowState]
            ) -> tuple[torch.Tensor, dict[int, str]]:
    """(tokens, {row: why}) for rows that sample (finite logits, ``row_max`` their maxima);
    a row with no usable distribution fails. ``logits`` may be scaled in place (the caller is
    done with them)."""
    dev = logits.device
    temps = torch.tensor([r.params["temperature"] for r in rows], device=dev)
    # One uniform number per row, a seeded row's from its own generator, then the inverse
    # CDF of its distribution: no row's draw depends on the others in the batch.
    u = torch.rand(len(rows), dtype=torch.float64)
    for j, r in enumerate(rows):
        if r.generator is not None:
            u[j] = torch.rand((), dtype=torch.float64, generator=r.generator)
    out = None
    if all(r.params["min_p"] <= 0 and r.params["top_k"] <= 0 and r.params["top_p"] >= 1.0
           for r in rows):  # the softmax itself, no filter: one native pass (None if none)
        out = ops.sample_logits(logits, row_max, temps, u)
    if out is None:
        if (temps != 1.0).any():
            logits.div_(temps[:, None])
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([r.params["min_p"] for r in rows], device=dev)
        if (min_p > 0).any():
            probs = probs * (probs >= min_p[:, None] * probs.max(dim=-1, keepdim=True).values)
        probs = _top_k_top_p(probs, [r.params["top_k"] for r in rows],
                             [r.params["top_p"] for r in rows])
        out = ops.sample_rows(probs, u)  # None off the CPU or without the kernel
        if out is None:
            out = _inverse_cdf(probs, u.to(dev))
    failed = {j: "sampling found no finite probability mass for this sequence"
              for j in (out < 0).nonzero()[:, 0].tolist()}
    return out, failed


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``kernels.ops.sample_rows`` in PyTorch: the first index whose running sum (in float64)
    exceeds ``u * total``; -1 for a row whose total is not positive and finite."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    out = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    return torch.where(torch.isfinite(total) & (total > 0), out, -1)


def _top_k_top_p(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    k = torch.tensor([k if k > 0 else probs.shape[-1] for k in top_k], device=probs.device)
    p = torch.tensor(top_p, device=probs.device)
    # Keep a token if it is within the top k and the mass before it is below p (the first
    # token is always kept); the mass is of the renormalised distribution.
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    keep = (rank < k[:, None]) & ((sorted_p.cumsum(-1) - sorted_p) < p[:, None])
    keep[:, 0] = True  # the most likely token survives any p, however small
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return filtered
