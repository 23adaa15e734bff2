"""The LLM engine: requests in, one batch per step, finished sequences out.

Note on the algorithm (first cut): each running sequence owns one contiguous KV-cache row of
``max_model_len`` tokens on every rank; as many rows as the device budget allows after the
weights. A step either prefills newly admitted prompts (up to a token budget) or decodes one
token for every running sequence; sequences leave as soon as they finish and waiting ones
take their rows. The paged engine replaces the cache layout behind the same interface.
"""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np

from shardserve.config import DeviceConfig, ModelConfig, ParallelConfig
from shardserve.engine.sequence import Sequence
from shardserve.models.registry import check_architecture
from shardserve.planner.memory import check_fits, format_bytes, kv_bytes_per_token
from shardserve.runtime.devices import parse_devices
from shardserve.runtime.executor import Executor
from shardserve.runtime.messages import NewRequest, StepInput, StepOutput
from shardserve.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, model: ModelConfig, parallel: ParallelConfig, device: DeviceConfig,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192) -> None:
        spec = model.spec
        check_architecture(spec.architecture)
        parallel.check_model(spec)
        tp = parallel.tensor_parallel_size
        devices = parse_devices(device.devices, device.device_memory)
        if tp > len(devices):
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} devices; --devices "
                             f"{device.devices!r} has {len(devices)}")
        self.weight_bytes = check_fits(spec, tp, model.torch_dtype_name,
                                       devices[0].memory_budget, len(devices))
        devices = devices[:tp]
        self.config, self.max_len = model, model.context_len
        self.num_slots = self._cache_slots(model, tp, devices[0].memory_budget, max_num_seqs)
        self.max_num_batched_tokens = max(max_num_batched_tokens, self.max_len)
        self.eos_ids = spec.eos_token_ids
        self.executor = Executor(model, devices)
        try:
            self.executor.collective_rpc("allocate_cache", num_slots=self.num_slots,
                                         max_len=self.max_len)
        except BaseException:
            self.executor.shutdown()
            raise
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self._released: list[str] = []
        self._ids = itertools.count()
        self.comm_seconds = 0.0

    def _cache_slots(self, model: ModelConfig, tp: int, budget: int, max_num_seqs: int) -> int:
        per_seq = kv_bytes_per_token(model.spec, tp, model.torch_dtype_name) * self.max_len
        slots = min(max_num_seqs, (budget - self.weight_bytes) // per_seq)
        if slots < 1:
            raise ValueError(
                f"the KV cache of one {self.max_len}-token sequence needs "
                f"{format_bytes(per_seq)} per device, but only "
                f"{format_bytes(budget - self.weight_bytes)} is left after weights; "
                "lower --max-model-len or raise --device-memory")
        return slots

    # -- requests --------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None, req_id: str | None = None) -> str:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty: give at least one token")
        if n >= self.max_len:
            raise ValueError(f"prompt has {n} tokens; the model's context is {self.max_len} "
                             "tokens, and at least one must be left to generate")
        vocab = self.config.spec.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        req_id = req_id if req_id is not None else str(next(self._ids))
        self.waiting.append(Sequence(req_id, list(prompt_token_ids), params, prompt))
        return req_id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the loop --------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Schedule, execute, postprocess: one batch; returns the sequences that finished."""
        inp = self._schedule()
        out = self.executor.execute_step(inp)
        return self._postprocess(out)

    def _schedule(self) -> StepInput:
        """Prefill admitted prompts if any fit, else decode every running sequence."""
        released, self._released = self._released, []
        new, tokens = [], 0
        while (self.waiting and len(self.running) < self.num_slots
               and (not new or tokens + len(self.waiting[0].prompt_token_ids)
                    <= self.max_num_batched_tokens)):
            seq = self.waiting.popleft()
            self.running[seq.req_id] = seq
            tokens += len(seq.prompt_token_ids)
            new.append(NewRequest(seq.req_id, seq.prompt_token_ids, seq.params.to_wire()))
        if new:
            return StepInput(new_requests=new, finished_ids=released)
        ids = list(self.running)
        last = np.array([self.running[r].output_token_ids[-1] for r in ids], dtype=np.int64)
        return StepInput(decode_ids=ids, decode_tokens=last, finished_ids=released)

    def _postprocess(self, out: StepOutput) -> list[Sequence]:
        self.comm_seconds += out.comm_seconds
        done = []
        for req_id, token in zip(out.req_ids, out.token_ids.tolist(), strict=True):
            seq = self.running[req_id]
            seq.append(token, self.eos_ids, self.max_len)
            if seq.finished:
                done.append(self.running.pop(req_id))
                self._released.append(req_id)
        return done

    def shutdown(self) -> None:
        self.executor.shutdown()
