"""A request's failure is that request's, on real workers: a sequence whose numbers go bad
fails alone while its batch-mates finish exactly as they would alone, and the cache blocks it
leaves behind poison nobody. Prefix-cache blocks are never shared across tenants."""

import shutil

import pytest
from safetensors.torch import load_file, save_file

from shardserve import LLM, SamplingParams
from shardserve.engine.request_state import RequestState

pytestmark = pytest.mark.slow
POISON = 7  # a token whose embedding row is NaN: any sequence holding it overflows


@pytest.fixture(scope="module")
def poisoned(checkpoints, tmp_path_factory):
    out = shutil.copytree(checkpoints["llama"], tmp_path_factory.mktemp("nan") / "llama")
    weights = load_file(str(out / "model.safetensors"))
    weights["model.embed_tokens.weight"][POISON] = float("nan")
    save_file(weights, str(out / "model.safetensors"))
    return str(out)


@pytest.mark.parametrize("tp", [1, 2])
def test_a_sequence_that_goes_bad_fails_alone(poisoned, tp):
    clean = [[1, 5, 6] * 7, [1, 8, 9, 10] * 9, [1, 11] * 20]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    with LLM(poisoned, tensor_parallel_size=tp, block_size=4) as llm:
        alone = [llm.generate(prompt_token_ids=[p], sampling_params=greedy)[0]
                 for p in clean]
        for bad_params in (greedy, sampled):
            outs = llm.generate(prompt_token_ids=[clean[0], [1, POISON, 3] * 5, clean[1],
                                                  clean[2]],
                                sampling_params=[greedy, bad_params, greedy, greedy])
            bad = outs[1]
            assert bad.finished and bad.error and "not finite" in bad.error
            assert bad.outputs[0].finish_reason == "error"
            assert [o.outputs[0].token_ids for o in outs[:1] + outs[2:]] == \
                [o.outputs[0].token_ids for o in alone]
        # the freed blocks held NaN keys and values; the requests that reuse them are clean
        again = llm.generate(prompt_token_ids=clean, sampling_params=greedy)
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids
                                                           for o in alone]
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_prefix_cache_blocks_are_not_shared_across_tenants(checkpoints):
    prompt = list(range(3, 3 + 80))
    params = SamplingParams(max_tokens=2, temperature=0)
    with LLM(str(checkpoints["llama"])) as llm:
        engine = llm.engine

        def run(rid, salt):
            engine.add_request(rid, prompt, params, cache_salt=salt)
            state = RequestState(rid, None, prompt, params)
            while engine.has_unfinished():
                for delta in engine.step():
                    if delta.request_id == rid:
                        state.update(delta)
            return state.output()

        first = run("a1", "acme")
        assert first.num_cached_tokens == 0
        assert run("a2", "acme").num_cached_tokens == 64  # its own blocks: a hit
        other = run("b1", "globex")
        assert other.num_cached_tokens == 0  # same prompt, another tenant: computed afresh
        assert other.outputs[0].token_ids == first.outputs[0].token_ids
        assert run("open", None).num_cached_tokens == 0
