"""Streaming and cancellation through the asyncio engine."""

import asyncio

import pytest

from shardserve import SamplingParams
from shardserve.config import CacheConfig, ModelConfig, SchedulerConfig
from shardserve.engine.async_engine import AsyncLLMEngine
from shardserve.engine.tokenizer import load_tokenizer
from shardserve.runtime.devices import parse_devices

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(checkpoints):
    config = ModelConfig(str(checkpoints["llama"]))
    eng = AsyncLLMEngine.spawn(config, parse_devices("cpu:2"), CacheConfig(), SchedulerConfig(),
                               "llama", "llama/0", load_tokenizer(config))
    yield eng
    eng.shutdown()


def test_streams_incrementally_and_concurrently(engine):
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)

    async def collect(rid, prompt):
        return [o async for o in engine.generate(prompt, params, rid)]

    async def main():
        return await asyncio.gather(collect("a", [1, 5, 6]), collect("b", [1, 7, 8, 9]))

    a, b = asyncio.run(main())
    for outs in (a, b):
        # A consumer that falls behind gets several steps' tokens merged into one output, so
        # the lengths grow but need not grow by one; each output extends the one before.
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert len(outs) > 1 and lengths == sorted(set(lengths)) and lengths[-1] == 48
        final = outs[-1].outputs[0].token_ids
        assert all(o.outputs[0].token_ids == final[:n] for o, n in zip(outs, lengths, strict=True))
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].finish_reason == "length"


def test_a_consumer_that_leaves_frees_its_blocks(engine):
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        gen = engine.generate(list(range(3, 300)), params, "leaver")
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()
        for _ in range(200):  # the abort is applied by the engine core between steps
            if engine.load.kv_usage == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert engine.load.kv_usage == 0


def test_explicit_abort_and_bad_input(engine):
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

    async def main():
        gen = engine.generate([1, 2, 3], params, "x")
        first = await gen.__anext__()
        await engine.abort("x")
        assert engine.load.kv_usage == 0  # freed when abort returns
        rest = [o async for o in gen]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        assert len(first.outputs[0].token_ids) >= 1
        with pytest.raises(ValueError, match="context is 1024 tokens"):
            async for _ in engine.generate([1] * 2000, params, "too-long"):
                pass

    asyncio.run(main())
