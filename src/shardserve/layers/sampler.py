"""Token sampling on the batch: greedy rows take the argmax; the others sample from
temperature-scaled, top-k / top-p filtered probabilities. A row with a seed draws from its own
generator, so its tokens do not depend on what else is in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    """Per-row sampling parameters of one step (B rows)."""

    temperature: list[float]
    top_k: list[int]  # 0 = off
    top_p: list[float]  # 1.0 = off
    generators: list[torch.Generator | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        """logits: (B, V) -> token ids (B,)."""
        logits = logits.float()
        out = logits.argmax(dim=-1)
        rows = [i for i, t in enumerate(st.temperature) if t > 0]
        if not rows:
            return out
        idx = torch.tensor(rows, device=logits.device)
        temp = torch.tensor([st.temperature[i] for i in rows], device=logits.device)
        probs = torch.softmax(logits[idx] / temp[:, None], dim=-1)
        probs = _top_k_top_p(probs, [st.top_k[i] for i in rows], [st.top_p[i] for i in rows])
        for j, i in enumerate(rows):
            out[i] = torch.multinomial(probs[j], 1, generator=st.generators[i])[0]
        return out


def _top_k_top_p(probs: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    k = torch.tensor([k if k > 0 else probs.shape[-1] for k in top_k], device=probs.device)
    p = torch.tensor(top_p, device=probs.device)
    # Keep a token if it is within the top k and the mass before it is below p (the first
    # token is always kept).
    keep = (rank < k[:, None]) & ((sorted_p.cumsum(-1) - sorted_p) < p[:, None])
    sorted_p = sorted_p * keep
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return filtered / filtered.sum(-1, keepdim=True)
