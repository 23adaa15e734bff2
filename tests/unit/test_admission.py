"""``within``: a deadline that never loses its caller's cancellation."""

import asyncio
import time

import pytest

from shardserve.api.admission import within


def test_a_cancel_that_meets_the_result_still_cancels():
    """The awaited value arrives in the same loop turn as the caller's cancellation (a client
    leaving as a step's output lands): the caller must still be cancelled, or a generation
    whose client left runs to its end. ``asyncio.wait_for`` on 3.11 returns the value."""
    async def main():
        fut = asyncio.get_running_loop().create_future()
        caller = asyncio.ensure_future(within(fut, time.monotonic() + 10))
        await asyncio.sleep(0)  # the caller now waits on fut
        fut.set_result("output")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller

    asyncio.run(main())


def test_deadline():
    async def main():
        with pytest.raises(TimeoutError):
            await within(asyncio.sleep(5), time.monotonic() + 0.05)
        assert await within(asyncio.sleep(0.01, "x"), time.monotonic() + 5) == "x"

    asyncio.run(main())
