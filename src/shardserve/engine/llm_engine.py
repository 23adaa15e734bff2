"""The LLM engine: requests in, one batch per step, outputs out.

``step()`` is schedule -> execute -> postprocess. The scheduler decides which sequences run
and how many tokens each computes; the executor runs that on every rank; postprocessing
appends the sampled tokens, applies the stop conditions, frees what finished and releases a
request's other ``n - 1`` completions once its prompt is in the cache (they then take the
prompt's blocks from the prefix cache instead of computing them again).

A step returns deltas (``RequestDelta``: each updated request's new tokens, logprobs and
finish reasons), never whole outputs: the consumer builds those (``engine/request_state.py``),
in this process for ``LLM`` or in the API process for a served engine core. Text is decoded
here only to match stop strings.

With pipeline parallelism the engine keeps up to ``pp`` batches in flight (micro-batches,
as vLLM's virtual engines): ``step()`` sends new batches of the sequences no in-flight batch
holds while there is room, then takes the oldest batch's output, so every stage has work.

With one worker the engine schedules one step ahead (vLLM's async scheduling): while the
worker computes step N, this process has already sent step N+1, in which every running
sequence computes the token step N samples; the worker appends its own samples to its
sequences (``StepInput.feed_samples``), so N+1 starts the moment N ends, and this process
takes N's output, appends the tokens, checks the stops and schedules N+2 while N+1 runs. A
sequence that N ends (a stop token, a stop string, an error) has computed one token for
nothing in N+1, which is dropped; one that N ends by its length is not scheduled in N+1.
A tensor-parallel group keeps one step at a time: only rank 0 samples.

A request's failure is that request's: a sequence the sampler could not serve, or whose
postprocessing raised, ends its request with an error and the batch goes on; a step the
workers raised on (with every rank still answering) fails the requests of that step only.
Only a dead or hung group (``WorkerError``) escapes ``step()``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from shardserve.config import (
    CacheConfig,
    DeviceConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.core_messages import RequestDelta, SeqDelta
from shardserve.engine.detokenizer import Detokenizer
from shardserve.engine.errors import InvalidRequest
from shardserve.engine.scheduler import Scheduler, SchedulerOutput
from shardserve.engine.sequence import Sequence
from shardserve.engine.validation import check_features, check_generation
from shardserve.planner.memory import format_bytes, stage_bytes
from shardserve.planner.specs import WhisperSpec
from shardserve.runtime.devices import Device, devices_for
from shardserve.runtime.executor import Executor, RemoteError, WorkerError
from shardserve.runtime.messages import NewRequest, StepInput, StepOutput
from shardserve.runtime.precision import Precision
from shardserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class _SequenceFailed(RuntimeError):
    """A sequence that cannot go on; the message is safe to show the client."""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    pending: list[Sequence] = field(default_factory=list)  # siblings waiting for the prompt
    error: str | None = None  # why it failed, if it did
    features: np.ndarray | None = None  # a speech model's audio (mels, frames)


@dataclass
class EngineStats:
    steps: int = 0
    step_seconds: float = 0.0  # wall time of execute_step, engine side
    worker_seconds: float = 0.0  # rank 0's time inside the step
    comm_seconds: float = 0.0  # rank 0's time in collectives
    schedule_seconds: float = 0.0  # scheduling + building the step + postprocessing
    prompt_tokens_computed: int = 0  # prompt tokens that went through the model
    generation_tokens: int = 0


class LLMEngine:
    def __init__(self, model: ModelConfig, parallel: ParallelConfig,
                 device: DeviceConfig | list[Device], cache: CacheConfig | None = None,
                 scheduler: SchedulerConfig | None = None, tokenizer=None, label: str = "",
                 step_timeout_s: float = 300.0, precision: Precision | None = None) -> None:
        """``precision``: as ``runtime/precision.choose`` would say, when the caller knows it
        (choosing loads the native kernels, and with them torch)."""
        cache, scheduler = cache or CacheConfig(), scheduler or SchedulerConfig()
        self.config, self.max_len, self.tokenizer = model, model.context_len, tokenizer
        self.eos_ids = model.eos_token_ids
        self.speech = isinstance(model.spec, WhisperSpec)  # requests bring audio features
        num_blocks, devices = self._plan(model, parallel, device, cache, scheduler, precision)
        log.info("%s: %s (%s)", label or model.path, self.precision.label, self.precision.note)
        split = [st.size for st in self.stages]
        kwargs = {}
        executor_cls = Executor
        if parallel.executor == "ray":
            from shardserve.runtime.ray_executor import RayExecutor

            executor_cls, kwargs = RayExecutor, {"address": parallel.ray_address}
        self.executor = executor_cls(model, devices, label, step_timeout_s,
                                     self.precision.compute, kv_cache_dtype=self.precision.kv,
                                     tp=parallel.tensor_parallel_size,
                                     pipeline_split=tuple(split) if len(split) > 1 else None,
                                     **kwargs)
        try:
            self.executor.collective_rpc(
                "allocate_kv_cache", num_blocks=num_blocks, block_size=cache.block_size,
                cross_slots=scheduler.max_num_seqs if self.speech else 0,
                max_seqs=scheduler.max_num_seqs, max_tokens=scheduler.max_num_batched_tokens)
        except BaseException:
            self.executor.shutdown()
            raise
        self.blocks = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler, self.blocks, self.max_len)
        self.requests: dict[str, _Request] = {}
        self.seqs: dict[str, Sequence] = {}
        self._known: dict[str, int] = {}  # seq id -> tokens the workers have (if running)
        self._on_workers: set[str] = set()  # seq ids workers hold any state for (RNG too)
        self._finished_ids: list[str] = []  # to tell the workers with the next step
        self._arrivals = 0
        self.pp = parallel.pipeline_parallel_size
        # one worker samples and feeds itself: schedule a step ahead (see the module's note)
        self.feeds = len(devices) == 1 and scheduler.async_scheduling
        self.depth = self.pp if not self.feeds else 2  # batches in flight
        self._inflight: deque[tuple[SchedulerOutput, StepInput, float]] = deque()
        self._failure: WorkerError | None = None  # met after a step's outputs were made
        self.stats = EngineStats()

    def _plan(self, model: ModelConfig, parallel: ParallelConfig,
              device: DeviceConfig | list[Device], cache: CacheConfig, sched: SchedulerConfig,
              precision: Precision | None):
        """Check everything fits before any worker starts; returns (num_blocks, devices).
        Weights count in their dtype, activations in the compute dtype, the KV cache in its."""
        parallel = parallel.for_batches(model.spec, sched.max_num_seqs, model.context_len)
        devices, _, self.precision = devices_for(model, parallel, device, precision)
        p, budget = self.precision, devices[0].memory_budget  # weights: checked there
        self.stages = stages = parallel.stages(model.spec)
        needs = stage_bytes(model.spec, parallel.tensor_parallel_size, stages, p.weights,
                            p.compute, p.kv, p.quantization, sched.max_num_batched_tokens,
                            sched.max_num_seqs)
        # every stage holds the same blocks, of its own layers: the tightest stage decides
        tight = min(needs, key=lambda n: n.kv_blocks(budget, cache.block_size))
        fit = tight.kv_blocks(budget, cache.block_size)
        free = budget - tight.weights - tight.activations
        per_seq_blocks = -(-self.max_len // cache.block_size)
        if cache.num_blocks is not None and cache.num_blocks > fit:
            raise ValueError(f"num_blocks={cache.num_blocks} does not fit: {fit} blocks fit in "
                             f"the {format_bytes(max(free, 0))} left per device")
        num_blocks = cache.num_blocks or min(fit, sched.max_num_seqs * per_seq_blocks)
        if cache.num_blocks is None and num_blocks < per_seq_blocks:
            need = per_seq_blocks * cache.block_size * tight.kv_per_token
            where = f" of pipeline {tight.stage.name}" if len(stages) > 1 else ""
            raise ValueError(
                f"the KV cache of one {self.max_len}-token sequence needs {format_bytes(need)} "
                f"per device{where}, but {format_bytes(max(free, 0))} is left after "
                f"{format_bytes(tight.weights)} of weights and "
                f"{format_bytes(tight.activations)} of activations; "
                "lower --max-model-len or --max-num-batched-tokens, or raise --device-memory")
        return num_blocks, devices[:parallel.world_size]

    # -- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, prompt: str | None = None,
                    cache_salt: str | None = None, features: np.ndarray | None = None) -> None:
        """Queue a request; ``InvalidRequest`` (naming the field) if it cannot run here.
        ``cache_salt`` (the tenant) keeps its prefix-cache blocks apart from other salts'.
        A speech model's request brings its audio as log-mel ``features`` (mels, frames)
        and its forced start tokens as the prompt."""
        self._validate(request_id, prompt_token_ids, params)
        if self.speech:
            features = check_features(self.config.spec, features)
            # the decoder's cache depends on the audio: no sharing across requests
            cache_salt = f"{cache_salt or ''}/audio/{request_id}"
        elif features is not None:
            raise InvalidRequest(f"{self.config.spec.architecture} takes no audio", "file")
        req = _Request(request_id, prompt, list(prompt_token_ids), params, [],
                       features=features)
        for i in range(params.n):
            seq = Sequence(f"{request_id}/{i}", request_id, i, list(prompt_token_ids), params,
                           self._arrivals, cache_salt=cache_salt)
            self._arrivals += 1
            req.seqs.append(seq)
            self.seqs[seq.seq_id] = seq
        req.pending = req.seqs[1:]
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])

    def _validate(self, request_id: str, ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise InvalidRequest(f"request_id {request_id!r} is already running")
        check_generation(ids, params, self.config.spec.vocab_size, self.max_len,
                         self.tokenizer is not None)
        need = self.blocks.blocks_needed(min(len(ids) + params.max_tokens, self.max_len))
        if need > self.blocks.num_blocks:
            raise InvalidRequest(f"prompt + max_tokens needs {need} KV blocks; the cache has "
                                 f"{self.blocks.num_blocks}: lower max_tokens or the prompt",
                                 "max_tokens")

    def abort_request(self, request_id: str) -> RequestDelta | None:
        """Stop a request now: its blocks are free when this returns."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
                self._forget(seq)
        self._release_if_idle()
        return self._delta(req)

    def _release_if_idle(self) -> None:
        """Finished sequences' worker state is dropped with the next step; with no next step
        in sight, send the release on its own."""
        if self._finished_ids and not self.has_unfinished() and self.executor.alive:
            ids, self._finished_ids = self._finished_ids, []
            try:
                self.executor.execute_step(StepInput(finished_ids=ids))
            except RemoteError:  # try again with the next step
                self._finished_ids.extend(ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._inflight)

    # -- the loop --------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """Send batches while fewer than ``depth`` are in flight and some sequence is free to
        run, then take the oldest batch's output and postprocess it. Returns a delta for every
        request that output changed."""
        if self._failure is not None:
            raise self._failure
        self._fill()
        if not self._inflight:
            return []
        sched, inp, t0 = self._inflight.popleft()
        t1 = time.perf_counter()
        try:
            out = self.executor.next_output()
        except RemoteError as e:  # the group is fine; this batch's requests are not
            self._finished_ids.extend(inp.finished_ids)  # the workers may not have seen them
            outputs = self._fail_step(sched, str(e))
            self._release_if_idle()
            return outputs
        t2 = time.perf_counter()
        outputs = self._postprocess(sched, out)
        self._release_if_idle()
        if self.depth > 1:  # the worker or first stage waits for these sequences: send it
            try:
                self._fill()
            except WorkerError as e:  # these outputs are delivered; the next step raises it
                self._failure = e
        s = self.stats
        s.steps += 1
        s.step_seconds += t2 - t1
        s.worker_seconds += out.worker_seconds
        s.comm_seconds += out.comm_seconds
        s.schedule_seconds += t0 + (time.perf_counter() - t2)
        return outputs

    def _fill(self) -> None:
        """Send batches while fewer than ``depth`` are in flight and some sequence is free."""
        while len(self._inflight) < self.depth and self._submit():
            pass

    def _submit(self) -> bool:
        """Schedule a batch (of the sequences no batch in flight holds, or ahead of the one
        in flight), and send it."""
        t0 = time.perf_counter()
        cap = -(-self.scheduler.config.max_num_seqs // self.pp)  # per micro-batch
        sched = self.scheduler.schedule(cap, ahead=self.feeds)
        if not sched.scheduled:
            return False
        inp = self._step_input(sched)
        self.executor.submit_step(inp)
        self._inflight.append((sched, inp, time.perf_counter() - t0))
        return True

    def _step_input(self, sched: SchedulerOutput) -> StepInput:
        inp = StepInput(finished_ids=self._finished_ids,
                        preempted_ids=[s.seq_id for s in sched.preempted],
                        feed_samples=self.feeds)
        self._finished_ids = []
        for seq in sched.preempted:
            self._known.pop(seq.seq_id, None)
        for item in sched.scheduled:
            seq = item.seq
            if item.is_new:
                self._on_workers.add(seq.seq_id)
                inp.new_requests.append(NewRequest(
                    seq.seq_id, seq.token_ids, len(seq.prompt_token_ids),
                    self.blocks.block_ids(seq.seq_id), seq.num_computed, self._wire(seq),
                    self.requests[seq.request_id].features))
            else:
                inp.cached_ids.append(seq.seq_id)
                inp.cached_new_tokens.append(seq.tokens_from(self._known[seq.seq_id]))
                inp.cached_new_blocks.append(item.new_blocks)
            self._known[seq.seq_id] = seq.num_tokens + seq.num_fed
            inp.req_ids.append(seq.seq_id)
            inp.num_tokens.append(item.num_tokens)
            prompt_left = len(seq.prompt_token_ids) - item.start
            self.stats.prompt_tokens_computed += max(0, min(item.num_tokens, prompt_left))
        return inp

    @staticmethod
    def _wire(seq: Sequence) -> dict:
        seed = seq.params.seed
        return seq.params.to_wire(None if seed is None else seed + seq.index)

    def _postprocess(self, sched: SchedulerOutput, out: StepOutput) -> list[RequestDelta]:
        for item in sched.scheduled:
            seq = item.seq
            if seq.finished:  # ended while its batch was in flight
                continue
            self.scheduler.computed(item)
            if self.blocks.has_new_full_blocks(seq.seq_id, seq.num_computed):
                self.blocks.commit(seq.seq_id, seq.token_ids, seq.num_computed)
        updated: dict[str, _Request] = {}
        appended = 0
        batch = {item.seq.seq_id: item.seq for item in sched.scheduled}  # not a reused id's
        for row, (seq_id, token) in enumerate(zip(out.req_ids, out.token_ids.tolist(),
                                                  strict=True)):
            seq = batch.get(seq_id)
            if seq is None or seq.finished:  # it ended after this batch went out, or its
                continue  # request failed earlier in this loop (a sibling's error)
            req = updated[seq.request_id] = self.requests[seq.request_id]
            try:
                if seq_id in out.failed:
                    raise _SequenceFailed(out.failed[seq_id])
                self._append(seq, token, out, row)
                appended += 1
            except Exception as e:  # this request's failure, not the batch's
                self._fail_request(req, e)
                continue
            if req.pending:  # the prompt is cached now: its siblings can start
                for sib in reversed(req.pending):
                    self.scheduler.add(sib, front=True)
                req.pending = []
        self.stats.generation_tokens += appended
        deltas = []
        for req in updated.values():
            if all(s.finished for s in req.seqs):
                del self.requests[req.request_id]
            deltas.append(self._delta(req))
        return deltas

    def _fail_step(self, sched: SchedulerOutput, error: str) -> list[RequestDelta]:
        """End every request of a step the workers raised on; the rest go on."""
        failed = {item.seq.request_id: self.requests[item.seq.request_id]
                  for item in sched.scheduled if item.seq.request_id in self.requests}
        for req in failed.values():
            self._fail_request(req, _SequenceFailed(f"the step running it failed ({error})"))
            del self.requests[req.request_id]
        return [self._delta(req) for req in failed.values()]

    def _fail_request(self, req: _Request, error: Exception) -> None:
        """Finish all of ``req``'s sequences with an error; the output says why."""
        if isinstance(error, _SequenceFailed):
            req.error = str(error)
        else:
            log.exception("request %s failed in postprocessing", req.request_id)
            req.error = f"internal error while finishing the request ({type(error).__name__})"
        req.pending = []
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq, "error")
                self._forget(seq)

    def _append(self, seq: Sequence, token: int, out: StepOutput, row: int) -> None:
        seq.output_token_ids.append(token)
        k = seq.params.logprobs
        if k is not None:
            entry = {token: float(out.logprobs[row])}
            if k:
                entry.update(zip(out.top_ids[row, :k].tolist(),
                                 out.top_logprobs[row, :k].tolist(), strict=True))
            seq.logprobs.append(entry)
        seq.check_stop(token, self.eos_ids, self.max_len)
        if seq.finish_reason is None and seq.params.stop:
            self._check_stop_strings(seq)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq, seq.finish_reason)
            self._forget(seq)

    def _check_stop_strings(self, seq: Sequence) -> None:
        if seq.detok is None:
            seq.detok = Detokenizer(self.tokenizer, seq.params.skip_special_tokens)
        old = len(seq.detok.text)
        seq.detok.push(seq.output_token_ids[-1:])
        text = seq.detok.text
        # Only text that is new this step can complete a match.
        start = max(0, old - max(map(len, seq.params.stop)) + 1)
        hits = [i for i in (text.find(s, start) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.finish_reason, seq.stop_text_len = "stop", min(hits)

    def _forget(self, seq: Sequence) -> None:
        self._known.pop(seq.seq_id, None)
        if seq.seq_id in self._on_workers:
            self._on_workers.discard(seq.seq_id)
            self._finished_ids.append(seq.seq_id)
        self.seqs.pop(seq.seq_id, None)

    # -- outputs ---------------------------------------------------------------------------
    def _delta(self, req: _Request) -> RequestDelta:
        """What changed in ``req`` since its last delta: every sequence with new tokens or a
        new finish."""
        seqs = []
        for s in req.seqs:
            if s.num_reported < 0:  # finished and reported
                continue
            new = s.output_token_ids[s.num_reported:]
            if not new and not s.finished:
                continue
            logprobs = None
            if s.params.logprobs is not None:
                logprobs, s.logprobs = s.logprobs, []
            seqs.append(SeqDelta(s.index, new, logprobs, s.finish_reason if s.finished else None,
                                 s.stop_text_len))
            # -1 once the finish is reported: a finished sequence is never reported again
            s.num_reported = -1 if s.finished else len(s.output_token_ids)
        return RequestDelta(req.request_id, seqs, all(s.finished for s in req.seqs),
                            sum(s.num_cached_prompt for s in req.seqs), req.error)

    def check_health(self, timeout_s: float) -> None:
        self.executor.check_health(timeout_s)

    def shutdown(self, kill: bool = False) -> None:
        """Stop the workers: politely, or at once with ``kill`` (after a failure)."""
        self.executor.stop(kill)
