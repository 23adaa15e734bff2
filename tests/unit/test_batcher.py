import asyncio
import time

import pytest

from shardserve.engine.batcher import DynamicBatcher


def _collecting():
    seen = []

    def run(items):
        seen.append(list(items))
        time.sleep(0.01)
        return [i * 10 for i in items]

    return run, seen


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows():
    run, seen = _collecting()
    b = DynamicBatcher(run, max_batch_size=8, max_queue_delay_ms=50)

    async def main():
        return await asyncio.gather(*(b.submit(i) for i in range(20)))

    assert asyncio.run(main()) == [i * 10 for i in range(20)]
    assert b.items == 20 and b.batches < 20  # passes were shared
    assert all(len(batch) <= 8 for batch in seen)  # oversize demand is split


def test_a_lone_request_waits_no_longer_than_the_delay():
    run, seen = _collecting()
    b = DynamicBatcher(run, max_batch_size=8, max_queue_delay_ms=30)

    async def main():
        t0 = time.monotonic()
        await b.submit(1)
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    assert seen == [[1]]
    assert elapsed < 0.03 + 0.01 + 0.2  # the delay, its compute, and scheduling slack


def test_padding_aware_grouping_keeps_similar_lengths_together():
    run, seen = _collecting()
    b = DynamicBatcher(run, max_batch_size=2, max_queue_delay_ms=50)

    async def main():
        sizes = [10, 500, 12, 480]
        return await asyncio.gather(*(b.submit(s, size=s) for s in sizes))

    asyncio.run(main())
    assert sorted(map(sorted, seen)) == [[10, 12], [480, 500]]


def test_timeouts_errors_and_bad_settings():
    def failing(items):
        raise RuntimeError("step 'embed' failed")

    b = DynamicBatcher(failing, max_batch_size=4)
    with pytest.raises(RuntimeError, match="embed"):
        asyncio.run(b.submit(1))
    slow = DynamicBatcher(lambda items: time.sleep(0.2) or items, max_batch_size=1,
                          timeout_s=0.05)

    async def main():
        return await asyncio.gather(slow.submit(1), slow.submit(2), return_exceptions=True)

    first, second = asyncio.run(main())
    assert first == 1 and isinstance(second, TimeoutError)
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        DynamicBatcher(failing, max_batch_size=4, preferred_batch_sizes=[8])
