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


def test_a_request_that_breaks_its_batch_fails_alone():
    def run(items):
        if -1 in items:
            raise RuntimeError("input -1 is poison")
        return [i * 10 for i in items]

    b = DynamicBatcher(run, max_batch_size=8, max_queue_delay_ms=30)

    async def main():
        return await asyncio.gather(*(b.submit(i) for i in (1, -1, 3)),
                                    return_exceptions=True)

    one, bad, three = asyncio.run(main())
    assert (one, three) == (10, 30) and "poison" in str(bad)


def test_close_drains_then_refuses_from_another_thread():
    import threading

    from shardserve.engine.errors import EngineUnavailable

    b = DynamicBatcher(lambda items: time.sleep(0.1) or items, max_batch_size=1)

    async def main():
        first = asyncio.ensure_future(b.submit(1))
        queued = [asyncio.ensure_future(b.submit(i)) for i in range(2, 12)]
        await asyncio.sleep(0.02)  # the first batch is on the model
        closer = threading.Thread(target=b.close, args=(0.15,))
        closer.start()
        await asyncio.sleep(0.01)
        with pytest.raises(EngineUnavailable):
            await b.submit(99)
        results = await asyncio.gather(first, *queued, return_exceptions=True)
        closer.join()
        return results

    results = asyncio.run(main())
    assert results[0] == 1  # in flight when the close came: finished
    assert any(isinstance(r, EngineUnavailable) for r in results)  # past the drain: refused
    assert all(r == i + 1 or isinstance(r, EngineUnavailable) for i, r in enumerate(results))
