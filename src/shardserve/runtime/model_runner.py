"""The model on one rank: its shard of the weights, its KV cache, and one step at a time.

Every rank runs the same step on its shard; logits are gathered on every rank, and the rank-0
runner samples. Per-request state (cache slot, cached length, sampling generator) lives here,
so a step only needs new requests in full and, for running ones, the token sampled last step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from shardserve.config import ModelConfig
from shardserve.layers.attention import AttentionMetadata
from shardserve.layers.sampler import Sampler, SamplingTensors
from shardserve.models.loader import LoadStats, load_weights
from shardserve.models.registry import model_class
from shardserve.planner.memory import format_bytes, kv_bytes_per_token
from shardserve.runtime.group import Group
from shardserve.runtime.messages import StepInput, StepOutput


@dataclass
class _Request:
    slot: int
    num_cached: int
    sampling: dict
    generator: torch.Generator | None


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, config: ModelConfig, group: Group, device: torch.device,
                 budget: int) -> None:
        self.config, self.group, self.device, self.budget = config, group, device, budget
        self.dtype = getattr(torch, config.torch_dtype_name)
        cls = model_class(config.spec.architecture)
        with _default_dtype(self.dtype), torch.device("meta"):
            need = _nbytes(cls(config.spec, config.context_len, group))
        if need > budget:
            raise MemoryError(f"rank {group.rank}: weights need {format_bytes(need)}, the device "
                              f"budget is {format_bytes(budget)}")
        with _default_dtype(self.dtype), device:
            self.model = cls(config.spec, config.context_len, group)
        self.load_stats: LoadStats = load_weights(self.model, config.path, self.dtype)
        self.weight_bytes = _nbytes(self.model)
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self.free_slots: list[int] = []
        self.cache_bytes = 0

    # -- control verbs ---------------------------------------------------------------------
    def allocate_cache(self, num_slots: int, max_len: int) -> int:
        """Preallocate ``num_slots`` contiguous cache rows of ``max_len`` tokens each."""
        spec = self.config.spec
        need = kv_bytes_per_token(spec, self.group.size, self.config.torch_dtype_name)
        need *= num_slots * max_len
        if self.weight_bytes + need > self.budget:
            raise MemoryError(
                f"KV cache for {num_slots} sequences x {max_len} tokens needs {format_bytes(need)}"
                f"; {format_bytes(self.budget - self.weight_bytes)} of the device budget is left "
                "after weights; lower the batch or max_model_len, or raise --device-memory")
        self.free_cache()
        for attn in self.model.attention_layers():
            shape = (num_slots, max_len, attn.num_kv_heads, attn.head_dim)
            attn.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.free_slots = list(range(num_slots))
        self.cache_bytes = need
        return need

    def free_cache(self) -> None:
        for attn in self.model.attention_layers():
            attn.k_cache = attn.v_cache = None
        self.requests.clear()
        self.free_slots = []
        self.cache_bytes = 0

    def stats(self) -> dict:
        return {"rank": self.group.rank, "weight_bytes": self.weight_bytes,
                "cache_bytes": self.cache_bytes, "budget": self.budget,
                "bytes_read": self.load_stats.bytes_read,
                "largest_read": self.load_stats.largest_read,
                "comm_seconds": self.group.comm_seconds}

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits at every position of one sequence (T, V), computed in a scratch cache."""
        saved = [(a.k_cache, a.v_cache) for a in self.model.attention_layers()]
        saved_state = self.requests, self.free_slots, self.cache_bytes
        try:
            self.requests = {}
            self.allocate_cache(1, len(token_ids))
            ids = torch.tensor(token_ids, device=self.device)
            pos = torch.arange(len(token_ids), device=self.device)
            meta = AttentionMetadata(torch.zeros_like(ids), pos, torch.zeros(1, dtype=torch.long,
                                     device=self.device), [len(ids)], [len(ids)], False)
            hidden = self.model(ids, pos, meta)
            return self.model.compute_logits(hidden).float().cpu().numpy()
        finally:
            for a, (k, v) in zip(self.model.attention_layers(), saved, strict=True):
                a.k_cache, a.v_cache = k, v
            self.requests, self.free_slots, self.cache_bytes = saved_state

    # -- the step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, inp: StepInput) -> StepOutput | None:
        """Run one batch; rank 0 returns the sampled tokens, other ranks ``None``."""
        for req_id in inp.finished_ids:
            self.free_slots.append(self.requests.pop(req_id).slot)
        ids, positions, meta, order = self._prepare(inp)
        comm0 = self.group.comm_seconds
        hidden = self.model(ids, positions, meta)
        last = torch.tensor(np.cumsum(meta.query_lens) - 1, device=self.device)
        logits = self.model.compute_logits(hidden[last])  # (B, V)
        if self.group.rank != 0:
            return None
        reqs = [self.requests[r] for r in order]
        st = SamplingTensors([r.sampling["temperature"] for r in reqs],
                             [r.sampling["top_k"] for r in reqs],
                             [r.sampling["top_p"] for r in reqs], [r.generator for r in reqs])
        tokens = self.sampler(logits, st).cpu().numpy()
        return StepOutput(order, tokens,
                          logits.float().cpu().numpy() if inp.return_logits else None,
                          self.group.comm_seconds - comm0)

    def _prepare(self, inp: StepInput):
        """Flatten the step's tokens: new prompts whole, then one token per decode."""
        ids: list[np.ndarray] = []
        slots, qlens, ctx, order = [], [], [], []
        for new in inp.new_requests:
            if not self.free_slots:
                raise RuntimeError("no free cache slot: the engine admitted too many sequences")
            gen = None
            if new.sampling.get("seed") is not None:
                gen = torch.Generator(device=self.device).manual_seed(new.sampling["seed"])
            req = _Request(self.free_slots.pop(), 0, new.sampling, gen)
            self.requests[new.req_id] = req
            ids.append(np.asarray(new.token_ids, dtype=np.int64))
            self._account(req, len(new.token_ids), slots, qlens, ctx)
            order.append(new.req_id)
        if inp.decode_ids:
            ids.append(np.asarray(inp.decode_tokens, dtype=np.int64))
            for req_id in inp.decode_ids:
                self._account(self.requests[req_id], 1, slots, qlens, ctx)
                order.append(req_id)
        positions = np.concatenate([np.arange(c - q, c) for q, c in zip(qlens, ctx, strict=True)])
        token_slots = np.repeat(slots, qlens)
        t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64)).to(self.device)  # noqa: E731
        meta = AttentionMetadata(t(token_slots), t(positions), t(slots), qlens, ctx,
                                 is_decode=not inp.new_requests)
        return t(np.concatenate(ids)), meta.positions, meta, order

    def _account(self, req: _Request, n: int, slots: list, qlens: list, ctx: list) -> None:
        req.num_cached += n
        slots.append(req.slot)
        qlens.append(n)
        ctx.append(req.num_cached)


def _nbytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
