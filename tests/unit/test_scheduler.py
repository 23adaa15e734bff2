"""The scheduler against a real BlockManager and no model: a loop that plays the engine."""

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
            seq.num_computed += item.num_tokens
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
    sched.schedule()  # short prefilled
    short.num_computed = 4
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
