"""The scheduler against a real BlockManager and no model: a loop that plays the engine."""

from collections import deque

from shardserve.config import SchedulerConfig
from shardserve.engine.block_manager import BlockManager
from shardserve.engine.scheduler import Scheduler
from shardserve.engine.sequence import Sequence
from shardserve.sampling_params import SamplingParams


def _seq(i, prompt_len, max_tokens):
    return Sequence(f"s{i}", f"r{i}", 0, list(range(1, prompt_len + 1)),
                    SamplingParams(max_tokens=max_tokens, ignore_eos=True), i)


def _run(sched, seqs, max_steps=10_000):
    """Drive to completion; each sequence 'samples' token 7 when its tokens are all computed."""
    for s in seqs:
        sched.add(s)
    log = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return log
        out = sched.schedule()
        assert out.scheduled, "no progress"
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        log.append(out)
        for item in out.scheduled:
            seq = item.seq
            sched.computed(item)
            sched.blocks.commit(seq.seq_id, seq.token_ids, seq.num_computed)
            if seq.num_computed == seq.num_tokens:
                seq.output_token_ids.append(7)
                seq.check_stop(7, (), 10_000)
                if seq.finish_reason:
                    sched.finish(seq, seq.finish_reason)
    raise AssertionError("did not finish")


def test_long_prompt_is_chunked_and_decodes_keep_running():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                      BlockManager(64, 16))
    short, long = _seq(0, 4, 20), _seq(1, 300, 2)
    sched.add(short)
    sched.computed(sched.schedule().scheduled[0])  # short prefilled
    short.output_token_ids.append(7)
    log = _run(sched, [long])
    chunks = [i.num_tokens for o in log for i in o.scheduled if i.seq is long]
    assert chunks == [63, 63, 63, 63, 48, 1]  # the budget less the running decode's token
    assert all(any(i.seq is short for i in o.scheduled) for o in log[:5])


def test_preemption_under_a_small_cache_finishes_everything_and_frees_all_blocks():
    bm = BlockManager(12, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), bm)
    seqs = [_seq(i, 5 + i, 12) for i in range(6)]
    _run(sched, seqs)
    assert sched.num_preemptions > 0
    assert all(s.finished and len(s.output_token_ids) == 12 for s in seqs)
    assert bm.num_free == 12


def test_waiting_sequences_take_cached_prefixes():
    bm = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    _run(sched, [_seq(0, 17, 1)])
    second = _seq(1, 17, 1)
    out = (sched.add(second), sched.schedule())[1]
    assert out.scheduled[0].num_tokens == 1 and second.num_cached_prompt == 16


def _run_ahead(sched, seqs, token=lambda seq: 7, eos=(), max_steps=10_000):
    """Drive an engine that schedules a step ahead (two batches in flight): a batch is taken
    back only after the next one was scheduled; the workers feed themselves the sampled
    token, which the engine appends when the batch comes back."""
    for s in seqs:
        sched.add(s)
    log, inflight = [], deque()
    for _ in range(max_steps):
        while len(inflight) < 2:
            out = sched.schedule(ahead=True)
            if not out.scheduled:
                break
            held = {i.seq.seq_id for batch in inflight for i in batch.scheduled}
            assert not {s.seq_id for s in out.preempted} & held, "preempted a busy sequence"
            assert out.num_tokens <= sched.config.max_num_batched_tokens
            log.append(out)
            inflight.append(out)
        if not inflight:
            assert not sched.has_unfinished()
            return log
        for item in inflight.popleft().scheduled:
            seq = item.seq
            if seq.finished:  # its batch ahead computed a token that is dropped
                continue
            sched.computed(item)
            sched.blocks.commit(seq.seq_id, seq.token_ids, seq.num_computed)
            if item.samples:
                t = token(seq)
                seq.output_token_ids.append(t)
                seq.check_stop(t, eos, 10_000)
                if seq.finish_reason:
                    sched.finish(seq, seq.finish_reason)
    raise AssertionError("did not finish")


def _count(seq):
    return 100 + len(seq.output_token_ids) + int(seq.seq_id[1:])


def test_ahead_every_step_holds_every_decode_and_the_outputs_are_the_same():
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    seqs = [_seq(0, 5, 6), _seq(1, 9, 6), _seq(2, 3, 6)]
    log = _run_ahead(sched, seqs, token=_count)
    # the prompts, then five steps of one token each, each scheduled before the one before
    # it came back; nothing after the sixth token (their length ends them)
    assert [[i.num_tokens for i in o.scheduled] for o in log] == [[5, 9, 3]] + [[1, 1, 1]] * 5
    assert [i.start for i in log[1].scheduled] == [5, 9, 3]
    assert all(i.samples for o in log for i in o.scheduled)
    synced = [_seq(0, 5, 6), _seq(1, 9, 6), _seq(2, 3, 6)]
    _run(Scheduler(SchedulerConfig(), BlockManager(64, 4)), synced)
    assert [s.output_token_ids for s in seqs] == \
        [[100 + k + i for k in range(6)] for i in range(3)]
    assert all(s.finish_reason == "length" for s in seqs) and bm.num_free == 64


def test_ahead_a_stop_token_costs_one_dropped_step_and_frees_everything():
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    stops = Sequence("s0", "r0", 0, [1, 2, 3, 4], SamplingParams(max_tokens=50), 0)
    runs = _seq(1, 4, 6)
    log = _run_ahead(sched, [stops, runs],
                     token=lambda s: 2 if s is stops and len(s.output_token_ids) == 2 else 7,
                     eos=(2,))
    assert stops.output_token_ids == [7, 7, 2] and stops.finish_reason == "stop"
    # the batch sent while its third token was sampled also held it: dropped
    assert sum(any(i.seq is stops for i in o.scheduled) for o in log) == 4
    assert runs.output_token_ids == [7] * 6 and bm.num_free == 64
    assert runs.num_fed == runs.num_ahead == 0


def test_ahead_a_chunked_prompt_sends_its_next_chunk_before_the_last_is_back():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                      BlockManager(64, 16))
    long = _seq(0, 300, 2)
    sched.add(long)
    first, second = sched.schedule(ahead=True), sched.schedule(ahead=True)
    assert [(i.start, i.num_tokens, i.samples) for i in first.scheduled + second.scheduled] \
        == [(0, 64, False), (64, 64, False)]
    assert long.num_computed == 0 and long.num_ahead == 128
    log = _run_ahead(sched, [])
    assert [(i.start, i.num_tokens) for o in log for i in o.scheduled] == \
        [(128, 64), (192, 64), (256, 44), (300, 1)]
    assert long.output_token_ids == [7, 7]


def test_ahead_under_a_small_cache_preempts_only_idle_sequences_and_finishes():
    bm = BlockManager(12, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), bm)
    seqs = [_seq(i, 5 + i, 12) for i in range(6)]
    _run_ahead(sched, seqs, token=_count)
    assert sched.num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == \
        [[100 + k + i for k in range(12)] for i in range(6)]
    assert bm.num_free == 12
