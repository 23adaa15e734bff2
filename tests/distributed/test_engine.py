"""The paged engine end to end on a random-weight llama with GQA, float32: a mixed batch of
64 equals each request run alone and equals transformers; a tight cache preempts and still
gives the same outputs with no leaked block; prefix caching, abort, seeds, n > 1, stop
strings and logprobs."""

import random

import pytest
import torch

from shardserve import LLM, SamplingParams

pytestmark = pytest.mark.slow


def _workload(count=64, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 900) for _ in range(rng.randint(5, 600))]
               for _ in range(count)]
    params = [SamplingParams(max_tokens=rng.randint(1, 200), temperature=0, ignore_eos=True)
              for _ in range(count)]
    return prompts, params


@pytest.fixture(scope="module")
def hf_greedy(checkpoints):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(checkpoints["llama"]), dtype=torch.float32)
    prompts, params = _workload()
    out = []
    with torch.no_grad():
        for p, sp in zip(prompts, params, strict=True):
            ids = hf.generate(torch.tensor([p]), max_new_tokens=sp.max_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("tp", [1, 2])
def test_mixed_batch_equals_alone_and_transformers(checkpoints, hf_greedy, tp):
    prompts, params = _workload()
    path = str(checkpoints["llama"])
    with LLM(path, tensor_parallel_size=tp, max_num_batched_tokens=512) as llm:
        batched = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=params))
        blocks = llm.engine.blocks
        assert blocks.num_free == blocks.num_blocks
    with LLM(path, tensor_parallel_size=tp, max_num_seqs=1, enable_prefix_caching=False) as llm:
        alone = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=params))
    assert [len(t) for t in batched] == [p.max_tokens for p in params]
    assert batched == alone
    assert batched == hf_greedy


def test_tight_cache_preempts_and_gives_the_same_outputs(checkpoints, hf_greedy):
    prompts, params = _workload()
    with LLM(str(checkpoints["llama"]), tensor_parallel_size=2, num_blocks=60,
             max_num_batched_tokens=512) as llm:
        outs = _tokens(llm.generate(prompt_token_ids=prompts, sampling_params=params))
        engine = llm.engine
        assert engine.scheduler.num_preemptions > 0
        assert engine.blocks.num_free == 60  # nothing leaked
        assert llm.engine.executor.collective_rpc("stats")[0]["num_seqs"] == 0
    assert outs == hf_greedy


def test_prefix_caching_computes_only_the_new_tokens(checkpoints):
    rng = random.Random(1)
    prefix = [rng.randrange(3, 900) for _ in range(512)]
    a, b = prefix + [5, 6, 7], prefix + [8, 9, 10, 11]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    with LLM(str(checkpoints["qwen2"]), tensor_parallel_size=2) as llm:
        llm.generate(prompt_token_ids=[a], sampling_params=greedy)
        before = llm.engine.stats.prompt_tokens_computed
        out = llm.generate(prompt_token_ids=[b], sampling_params=greedy)[0]
        computed = llm.engine.stats.prompt_tokens_computed - before
    assert out.num_cached_tokens == 512 and computed == len(b) - 512
    with LLM(str(checkpoints["qwen2"]), tensor_parallel_size=2,
             enable_prefix_caching=False) as llm:
        assert llm.generate(prompt_token_ids=[b], sampling_params=greedy)[0].outputs[0] \
            .token_ids == out.outputs[0].token_ids


def test_abort_frees_blocks_at_once(checkpoints):
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    with LLM(str(checkpoints["mistral"])) as llm:
        engine = llm.engine
        for i in range(3):
            engine.add_request(f"r{i}", list(range(3, 3 + 40 * (i + 1))), long)
        for _ in range(5):
            engine.step()
        held = len(engine.blocks.block_ids("r1/0"))
        free = engine.blocks.num_free
        out = engine.abort_request("r1")
        assert out.finished and out.seqs[0].finish_reason == "abort"
        assert engine.blocks.num_free == free + held
        while engine.has_unfinished():
            engine.step()
        assert engine.blocks.num_free == engine.blocks.num_blocks
        assert engine.executor.collective_rpc("stats")[0]["num_seqs"] == 0


def test_seeds_n_and_stops(checkpoints):
    with LLM(str(checkpoints["llama"]), tensor_parallel_size=2) as llm:
        sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=3, n=3,
                                 ignore_eos=True)
        one = llm.generate(prompt_token_ids=[[1, 50, 60, 70] * 10], sampling_params=sampled)[0]
        other = llm.generate(prompt_token_ids=[[1, 50, 60, 70] * 10, [1, 2, 3]],
                             sampling_params=sampled)[0]
        assert [c.token_ids for c in one.outputs] == [c.token_ids for c in other.outputs]
        assert len({tuple(c.token_ids) for c in one.outputs}) == 3  # the n completions differ
        assert one.num_cached_tokens == 2 * 32  # siblings took the prompt's two full blocks

        greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
        ref = llm.generate(prompt_token_ids=[[1, 9, 9]], sampling_params=greedy)[0].outputs[0]
        stop_tok = ref.token_ids[5]
        first = ref.token_ids.index(stop_tok)
        stopped = llm.generate(prompt_token_ids=[[1, 9, 9]], sampling_params=SamplingParams(
            max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop_tok]))[0]
        assert stopped.outputs[0].token_ids == ref.token_ids[:first + 1]
        assert stopped.outputs[0].finish_reason == "stop"
        # a stop string: the text of one generated token, cut where it first appears
        pieces = [llm.tokenizer.decode([t]) for t in ref.token_ids[3:]]
        needle = next(p for p in pieces if p.strip() and p in ref.text)
        by_text = llm.generate(prompt_token_ids=[[1, 9, 9]], sampling_params=SamplingParams(
            max_tokens=20, temperature=0, ignore_eos=True, stop=[needle]))[0].outputs[0]
        assert by_text.text == ref.text[:ref.text.find(needle)]
        assert by_text.finish_reason == "stop"


def test_seeded_sampling_survives_preemption(checkpoints):
    prompts, _ = _workload(16, seed=5)
    params = [SamplingParams(max_tokens=60, temperature=0.9, top_k=50, seed=i, ignore_eos=True)
              for i in range(16)]
    runs = []
    for num_blocks in (None, 45):
        with LLM(str(checkpoints["llama"]), num_blocks=num_blocks) as llm:
            runs.append(_tokens(llm.generate(prompt_token_ids=prompts, sampling_params=params)))
            preempted = llm.engine.scheduler.num_preemptions
    assert preempted > 0
    assert runs[0] == runs[1]


def test_logprobs_match_transformers(checkpoints):
    from transformers import AutoModelForCausalLM

    prompt = [1, 40, 41, 42, 43, 44]
    with LLM(str(checkpoints["qwen2"]), tensor_parallel_size=2) as llm:
        out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
            max_tokens=5, temperature=0, ignore_eos=True, logprobs=3))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoints["qwen2"]), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1:-1]
    ref = torch.log_softmax(logits, -1)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert len(entry) == 3 and token in entry
        for tok, lp in entry.items():
            assert abs(lp - float(ref[step, tok])) < 1e-4
        assert set(entry) == set(ref[step].topk(3).indices.tolist())


def test_allowed_token_ids_restrict_each_step_to_them(checkpoints):
    """``allowed_token_ids`` hold at every step, greedy or sampled, for that request only;
    ``prefix_allowed_token_ids`` decide the first tokens greedily (sampled or not), then the
    request is free."""
    from transformers import AutoModelForCausalLM

    prompt = [1, 40, 41, 42, 43, 44]
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoints["llama"]), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1]
    best = logits.topk(5).indices.tolist()
    allowed = [7, 300, 555] + best[3:]  # the model's 4th and 5th choices, and three others
    with LLM(str(checkpoints["llama"]), tensor_parallel_size=2) as llm:
        greedy, sampled, free, prefixed, hot = llm.generate(
            prompt_token_ids=[prompt] * 5, sampling_params=[
                SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                               allowed_token_ids=allowed),
                SamplingParams(max_tokens=40, temperature=1.5, seed=1, ignore_eos=True,
                               allowed_token_ids=allowed),
                SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                               prefix_allowed_token_ids=[allowed, [77]]),
                SamplingParams(max_tokens=6, temperature=1.5, seed=2, ignore_eos=True,
                               prefix_allowed_token_ids=[allowed, [77]])])
        # after its prefix a request is free: what greedy gives from the prompt and prefix
        went = prefixed.outputs[0].token_ids
        after = llm.generate(prompt_token_ids=[prompt + went[:2]], sampling_params=SamplingParams(
            max_tokens=4, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    assert went[:2] == [max(allowed, key=lambda t: float(logits[t])), 77] and went[2:] == after
    assert hot.outputs[0].token_ids[:2] == went[:2]  # a prefix is greedy, sampled or not
    want = max(allowed, key=lambda t: float(logits[t]))
    assert greedy.outputs[0].token_ids[0] == want and want != free.outputs[0].token_ids[0]
    assert set(greedy.outputs[0].token_ids + sampled.outputs[0].token_ids) <= set(allowed)
    assert len(set(sampled.outputs[0].token_ids)) > 1  # sampled among them, not one forced
    assert free.outputs[0].token_ids[0] == best[0]  # a batch-mate is not restricted


def test_one_worker_schedules_a_step_ahead_with_the_outputs_of_one_step_at_a_time(checkpoints):
    """Async scheduling: the next step is sent before this one's output is read. Greedy,
    seeded n > 1 with logprobs, a stop token and a stop string give what the engine that
    waits for each step gives; the token a stop cut is dropped, and a request id reused the
    moment its request ends gets only its own tokens."""
    path = str(checkpoints["llama"])
    prompts = [[1, 9, 9], [1, 50, 60, 70] * 10, [3, 4] * 20]
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=3, n=2,
                             ignore_eos=True, logprobs=2)

    def run(llm):
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=greedy)
        ref = outs[0].outputs[0]
        stop_tok = ref.token_ids[5]
        needle = next(p for p in (llm.tokenizer.decode([t]) for t in ref.token_ids[3:])
                      if p.strip() and p in ref.text)
        cut = llm.generate(prompt_token_ids=[prompts[0]] * 2, sampling_params=[
            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                           stop_token_ids=[stop_tok]),
            SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[needle])])
        seeded = llm.generate(prompt_token_ids=prompts[1:], sampling_params=sampled)
        return ([o.outputs[0].token_ids for o in outs],
                [(o.outputs[0].token_ids, o.outputs[0].text) for o in cut],
                [[(c.token_ids, c.logprobs) for c in o.outputs] for o in seeded])

    with LLM(path, async_scheduling=False) as llm:
        assert llm.engine.depth == 1
        want = run(llm)
    with LLM(path) as llm:
        engine = llm.engine
        assert engine.feeds and engine.depth == 2
        got = run(llm)
        # a stop token ends "a"; a new "a" comes at once, while a step holding the old is out
        stop_tok = want[0][0][5]
        engine.add_request("a", prompts[0], SamplingParams(
            max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop_tok]))
        engine.add_request("b", prompts[1], greedy)
        tokens, ahead = {"a": [], "b": [], "a again": []}, 0
        while engine.has_unfinished():
            for d in engine.step():
                key = "a again" if d.request_id == "a" and tokens["a"][-1:] == [stop_tok] \
                    else d.request_id
                tokens[key] += d.seqs[0].token_ids if d.seqs else []
                if key == "a" and d.finished:
                    engine.add_request("a", prompts[2], greedy)
            ahead = max(ahead, engine.executor.steps_in_flight)
        assert ahead == 2
        assert engine.blocks.num_free == engine.blocks.num_blocks
        assert engine.executor.collective_rpc("stats")[0]["num_seqs"] == 0
    assert got[0] == want[0] and got[1] == want[1]
    for ours, theirs in zip(got[2], want[2], strict=True):
        assert [t for t, _ in ours] == [t for t, _ in theirs]
        for (_, lp), (_, ref) in zip(ours, theirs, strict=True):
            assert [e.keys() for e in lp] == [e.keys() for e in ref]
            assert all(abs(a[k] - b[k]) < 1e-4 for a, b in zip(lp, ref, strict=True) for k in a)
    first = want[0][0].index(stop_tok)
    assert tokens == {"a": want[0][0][:first + 1], "b": want[0][1], "a again": want[0][2]}


def test_a_failed_step_feeds_placeholders_so_the_step_sent_behind_it_runs(checkpoints):
    """On the worker: with ``feed_samples`` each sampled token is appended to its sequence;
    a step that raises leaves a placeholder instead, so the step the engine already sent
    behind it runs, and a new sequence in that step gets its own right token."""
    from shardserve.config import ModelConfig
    from shardserve.runtime.group import FakeGroup
    from shardserve.runtime.messages import NewRequest, StepInput
    from shardserve.runtime.model_runner import ModelRunner

    greedy = SamplingParams(temperature=0, max_tokens=8).to_wire()
    with torch.inference_mode():
        r = ModelRunner(ModelConfig(str(checkpoints["llama"])), FakeGroup(0, 1),
                        torch.device("cpu"), 1 << 30)
        r.allocate_kv_cache(64, 16, max_seqs=4)
        out = r.step(StepInput(new_requests=[NewRequest("a", [1, 5, 6, 7], 4, [0], 0, greedy)],
                               req_ids=["a"], num_tokens=[4], feed_samples=True))
        assert r.seqs["a"].tokens == [1, 5, 6, 7, int(out.token_ids[0])]
        ahead = StepInput(cached_ids=["a"], cached_new_tokens=[[]], cached_new_blocks=[[]],
                          req_ids=["a"], num_tokens=[1], feed_samples=True)
        sample, r._sample = r._sample, None  # the step fails after computing its tokens
        with pytest.raises(TypeError):
            r.step(ahead)
        r._sample = sample
        assert r.seqs["a"].tokens[-1] == 0 and r.seqs["a"].num_computed == 5
        prompt = [1, 40, 41, 42, 43]
        behind = StepInput(new_requests=[NewRequest("b", prompt, 5, [1], 0, greedy)],
                           cached_ids=["a"], cached_new_tokens=[[]], cached_new_blocks=[[]],
                           req_ids=["a", "b"], num_tokens=[1, 5], feed_samples=True)
        out = r.step(behind)
        assert out.req_ids == ["a", "b"] and not out.failed
        want = int(r.prompt_logits(prompt)[-1].argmax())
        assert int(out.token_ids[1]) == want and r.seqs["b"].tokens == prompt + [want]
