"""Continuous batching with chunked prefill and preemption by recompute.

Note on the algorithm: a step has a token budget. Running sequences go first, in arrival
order: each asks for the tokens it has not computed yet (one when decoding, the rest of its
prompt when its prefill was chunked), capped by what is left of the budget. When the cache
has no block for one, the latest-arrived running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed later from its tokens (prefix
caching usually gives most of them back). Then, if nothing was preempted, waiting sequences
are admitted in order while the budget, ``max_num_seqs`` and the cache allow, each taking the
longest cached prefix of its tokens first.

With several batches in flight, a sequence a batch in flight holds is ``busy``
(``num_ahead`` of its tokens are being computed) and is never a preemption victim. Pipeline
micro-batches skip busy sequences and take at most ``max_seqs`` each, so the running sequences
spread over them. Scheduling ``ahead`` (one worker, vLLM's async scheduling) instead gives a
busy sequence its next tokens at once: a decoding sequence computes the token the workers
sample in the batch before (``num_fed``, which they feed themselves), a chunked prompt its
next chunk. A step ahead never preempts, and a sequence whose fed token certainly ends it
(its length) is not scheduled again.
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
    start: int = 0  # position of its first token
    samples: bool = False  # computes all its known tokens: a token is sampled for it
    fed: bool = False  # ... which the workers append themselves (counted in num_fed)


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager,
                 max_len: int = 1 << 62) -> None:
        self.config, self.blocks, self.max_len = config, blocks, max_len
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

    def schedule(self, max_seqs: int | None = None, ahead: bool = False) -> SchedulerOutput:
        out = SchedulerOutput()
        cap = max_seqs or self.config.max_num_seqs
        budget = self._schedule_running(out, self.config.max_num_batched_tokens, cap, ahead)
        if not out.preempted:
            self._schedule_waiting(out, budget, cap, ahead)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, cap: int,
                          ahead: bool) -> int:
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < cap:
            seq = self.running[i]
            i += 1
            if seq.busy and not ahead:
                continue
            start = seq.num_computed + seq.num_ahead
            n = min(seq.num_tokens + seq.num_fed - start, budget)
            if n <= 0 or seq.stops_at_fed(self.max_len):
                continue
            while not self.blocks.can_allocate(seq.seq_id, start + n):
                if seq.busy:  # no room for a step ahead: it waits for its batch instead
                    break
                victim = next(s for s in reversed(self.running) if not s.busy)
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return budget
                i = self.running.index(seq) + 1
            else:
                self._take(out, seq, n, self.blocks.allocate(seq.seq_id, start + n), False,
                           start, ahead)
                budget -= n
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, cap: int,
                          ahead: bool) -> None:
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
            self._take(out, seq, n, new_blocks, True, cached, ahead)
            budget -= n

    @staticmethod
    def _take(out: SchedulerOutput, seq: Sequence, n: int, new_blocks: list[int],
              is_new: bool, start: int, ahead: bool) -> None:
        samples = start + n == seq.num_tokens + seq.num_fed
        fed = samples and ahead
        seq.num_ahead += n
        seq.num_fed += fed
        out.scheduled.append(Scheduled(seq, n, new_blocks, is_new, start, samples, fed))

    @staticmethod
    def computed(item: Scheduled) -> None:
        """``item``'s batch is back: its tokens are in the cache, and the token the workers
        fed themselves is the caller's to append."""
        item.seq.num_ahead -= item.num_tokens
        item.seq.num_computed += item.num_tokens
        item.seq.num_fed -= item.fed

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
