"""Continuous batching with chunked prefill and preemption by recompute.

Note on the algorithm: a step has a token budget. Running sequences go first, in arrival
order: each asks for the tokens it has not computed yet (one when decoding, the rest of its
prompt when its prefill was chunked), capped by what is left of the budget. When the cache
has no block for one, the latest-arrived running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed later from its tokens (prefix
caching usually gives most of them back). Then, if nothing was preempted, waiting sequences
are admitted in order while the budget, ``max_num_seqs`` and the cache allow, each taking the
longest cached prefix of its tokens first.

With several batches in flight (pipeline parallelism), a step skips the sequences another
in-flight batch holds (``busy``) and takes at most ``max_seqs`` of them, so the running
sequences spread over the micro-batches; a preemption victim is never a busy sequence.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from shardserve.config import SchedulerConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens computed for it in this step
    new_blocks: list[int]
    is_new: bool  # workers have no state for it (first run, or resumed after preemption)


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, busy: set[str] | frozenset[str] = frozenset(),
                 max_seqs: int | None = None) -> SchedulerOutput:
        out = SchedulerOutput()
        cap = max_seqs or self.config.max_num_seqs
        budget = self._schedule_running(out, self.config.max_num_batched_tokens, busy, cap)
        if not out.preempted:
            self._schedule_waiting(out, budget, cap)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, busy, cap: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < cap:
            seq = self.running[i]
            if seq.seq_id in busy:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.can_allocate(seq.seq_id, seq.num_computed + n):
                victim = next(s for s in reversed(self.running) if s.seq_id not in busy)
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return budget
            out.scheduled.append(Scheduled(
                seq, n, self.blocks.allocate(seq.seq_id, seq.num_computed + n), False))
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, cap: int) -> None:
        bs = self.blocks.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs \
                and len(out.scheduled) < cap:
            seq = self.waiting[0]
            tokens = seq.token_ids
            hits = self.blocks.match_prefix(tokens, seq.cache_salt)
            cached = len(hits) * bs
            n = min(len(tokens) - cached, budget)
            if not self.blocks.can_allocate(seq.seq_id, cached + n, hits):
                break
            self.waiting.popleft()
            new_blocks = self.blocks.allocate(seq.seq_id, cached + n, hits, seq.cache_salt)
            seq.num_computed = cached
            seq.num_cached_prompt += min(cached, len(seq.prompt_token_ids))
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(Scheduled(seq, n, new_blocks, True))
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_seq(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq, front=True)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (done or aborted) wherever it is and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or reason
