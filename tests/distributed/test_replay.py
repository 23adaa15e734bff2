"""Recorded decode steps (runtime/replay.py) give what the step run layer by layer gives, bit
for bit: logits of every batch size in process, and the engine's tokens and logprobs for
each family and weight type, with sequences joining, finishing and being preempted between
steps; a step that would run PyTorch between its kernels is never recorded."""

import numpy as np
import pytest
import torch

from shardserve import LLM, SamplingParams, test_models
from shardserve.config import ModelConfig
from shardserve.planner.memory import replay_bytes
from shardserve.runtime.group import FakeGroup
from shardserve.runtime.messages import NewRequest, StepInput
from shardserve.runtime.model_runner import ModelRunner

pytestmark = pytest.mark.slow


def _runner(path) -> ModelRunner:
    r = ModelRunner(ModelConfig(str(path)), FakeGroup(0, 1), torch.device("cpu"), 1 << 30)
    r.allocate_kv_cache(1024, 16, max_seqs=32)
    return r


def _decode_logits(r: ModelRunner, sizes: list[int], steps: int) -> list[np.ndarray]:
    """Logits of every step: for batches of each size (their own sequences) a prefill and
    ``steps`` decode steps."""
    got, rng = [], np.random.default_rng(0)
    sample = r._sample

    def keep(order, done, logits, *args):
        if logits is not None:
            got.append(logits.numpy().copy())
        return sample(order, done, logits, *args)
    r._sample = keep
    for b, n in enumerate(sizes):
        reqs = [NewRequest(f"{b}-{i}", rng.integers(3, 200, 20 + 3 * i).tolist(), 20 + 3 * i,
                           list(range(i * 10, i * 10 + 10)), 0,
                           SamplingParams(temperature=0, max_tokens=40).to_wire())
                for i in range(n)]
        ids = [q.req_id for q in reqs]
        r.step(StepInput(new_requests=reqs, req_ids=ids, num_tokens=[len(q.token_ids)
                                                                     for q in reqs]))
        for s in range(steps):
            r.step(StepInput(cached_ids=ids, cached_new_tokens=[[5 + s]] * n,
                             cached_new_blocks=[[]] * n, req_ids=ids, num_tokens=[1] * n))
        r.step(StepInput(finished_ids=ids))
    r._sample = sample
    return got  # the prefill steps' logits too


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_replayed_steps_equal_the_layer_by_layer_ones(checkpoints, arch, monkeypatch):
    sizes = [1, 3, 1, 16, 3, 29]  # recorded once, replayed after
    with torch.inference_mode():
        r = _runner(checkpoints[arch])
        assert r.replay is not None
        fast = _decode_logits(r, sizes, 3)
        kept = {n for n, prog in r.replay.programs.items() if prog is not None}
        # every size recorded at its first step (16 and 29: unless the head ran PyTorch)
        # and replayed at each later one
        assert set(r.replay.programs) == {1, 3, 16, 29} and {1, 3} <= kept
        assert r.replay.replays == sum(3 for n in sizes if n in kept) - len(kept)
        monkeypatch.setenv("SHARDSERVE_REPLAY", "0")
        plain = _runner(checkpoints[arch])
        assert plain.replay is None
        slow = _decode_logits(plain, sizes, 3)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", ["bfloat16", "int8"])
def test_the_engine_gives_the_same_tokens_with_and_without_replays(tmp_path, variant,
                                                                   monkeypatch):
    path = test_models.write(tmp_path / "m", "llama", "tiny", seed=1,
                             dtype="bfloat16" if variant == "bfloat16" else "float32")
    kw = {"quantization": "int8"} if variant == "int8" else {}
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 500, int(rng.integers(5, 60))).tolist() for _ in range(6)]
    params = [SamplingParams(max_tokens=int(rng.integers(8, 40)), ignore_eos=True, logprobs=2,
                             temperature=0 if i % 2 else 0.8, seed=i) for i in range(6)]
    runs = []
    for on in ("1", "0"):
        monkeypatch.setenv("SHARDSERVE_REPLAY", on)
        # a small cache: sequences are preempted and come back between recorded steps
        with LLM(str(path), num_blocks=14, block_size=8, max_num_seqs=4, **kw) as llm:
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            stats = llm.engine.executor.collective_rpc("stats")[0]
            runs.append(([o.outputs[0].token_ids for o in outs],
                          [o.outputs[0].logprobs for o in outs], stats["replayed_steps"],
                          llm.engine.scheduler.num_preemptions))
    (tokens, logprobs, replayed, preempted), (tokens0, logprobs0, replayed0, _) = runs
    assert replayed > 50 and replayed0 == 0 and preempted > 0
    assert tokens == tokens0 and logprobs == logprobs0


def test_a_step_with_pytorch_between_kernels_is_not_recorded(checkpoints, monkeypatch):
    """Without the native RMSNorm the layers run a PyTorch norm: nothing is recorded and
    the steps run as before."""
    from shardserve.kernels import ops

    monkeypatch.setattr(ops, "add_rms_norm", lambda *a: None)
    with torch.inference_mode():
        r = _runner(checkpoints["llama"])
        got = _decode_logits(r, [2, 2], 2)
    assert r.replay.programs == {2: None} and r.replay.replays == 0
    assert all(np.isfinite(g).all() for g in got)


def test_replays_keep_to_the_memory_the_plan_reserves(checkpoints):
    """Recordings share one arena, laid out by the lifetimes of a step's tensors: every size
    up to ``max_seqs`` fits in ``replay_bytes`` (far less than keeping every tensor of a
    step), the arena is the largest size's, and a size that would pass the reserve is not
    recorded."""
    with torch.inference_mode():
        r = _runner(checkpoints["llama"])
        _decode_logits(r, [1, 32, 2, 7], 2)
        assert all(r.replay.programs[n] for n in (1, 2, 7, 32))
        assert r.replay.kept_bytes == max(p.size for p in r.replay.programs.values())
        assert 0 < r.replay.kept_bytes <= replay_bytes(r.config.spec, 1, 32)
        spec = r.config.spec  # every layer's outputs for 32 rows, and the logits
        every_layer = 32 * 4 * (spec.num_layers * (6 * spec.hidden_size + 4 * 2048)
                                + spec.vocab_size)
        assert r.replay.kept_bytes < every_layer / 2
        r.allocate_kv_cache(1024, 16, max_seqs=32)
        r.replay.max_bytes = 0
        _decode_logits(r, [1, 1], 2)
        assert r.replay.programs == {1: None} and r.replay.kept_bytes == 0
        # a step being recorded keeps its tensors until it ends: past the activation reserve
        # (here a small one) that batch size is not recorded, and the step's logits stand
        r.allocate_kv_cache(1024, 16, max_seqs=32, max_tokens=16)
        assert r.replay.record_bytes < 1 << 20
        got = _decode_logits(r, [2, 24], 2)
        assert r.replay.programs[2] is not None and r.replay.programs[24] is None
        assert all(np.isfinite(g).all() for g in got)


@pytest.mark.parametrize("pp", [2, 3])
def test_pipeline_stages_replay_their_layers(tmp_path, pp, monkeypatch):
    """At pp > 1 each stage replays its own layers between receiving and sending: tokens and
    logprobs equal a run without replays, and every stage replayed."""
    path = test_models.write(tmp_path / "m", "llama", "tiny", seed=2,
                             overrides={"num_hidden_layers": 5})  # uneven stages at pp=3
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 500, int(rng.integers(5, 40))).tolist() for _ in range(5)]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2, temperature=0)
    runs = []
    for on in ("1", "0"):
        monkeypatch.setenv("SHARDSERVE_REPLAY", on)
        with LLM(str(path), pipeline_parallel_size=pp, devices=f"cpu:{pp}",
                 max_num_seqs=4) as llm:
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            stats = llm.engine.executor.collective_rpc("stats")
            runs.append(([o.outputs[0].token_ids for o in outs],
                         [o.outputs[0].logprobs for o in outs],
                         [s["replayed_steps"] for s in stats]))
    (tokens, logprobs, replayed), (tokens0, logprobs0, replayed0) = runs
    assert len(replayed) == pp and min(replayed) > 5 and replayed0 == [0] * pp
    assert tokens == tokens0 and logprobs == logprobs0
