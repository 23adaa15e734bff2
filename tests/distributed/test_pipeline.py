"""Pipeline parallelism on real workers: stages of contiguous layers, each its own tp group,
hidden states passed stage to stage, several micro-batches in flight.

Parity with Hugging Face transformers (float32, the tolerances of test_parity.py) at pp=2,
pp=3 (4 layers: uneven stages) and tp=2 x pp=2, for an untied model (llama) and a tied one with
QKV bias (qwen2: the last stage reads its own copy of the embedding as its head), and splits
inside a layer: a stage of one attention block, one whose head has a layer's MLP only, and
tp=2 x pp=2 with a layer cut between its attention and its MLP.
"""

import pytest
import torch

from shardserve import LLM, SamplingParams, test_models
from shardserve.config import ModelConfig, ParallelConfig
from shardserve.engine import llm_engine
from shardserve.planner.memory import weight_bytes_per_device

pytestmark = pytest.mark.slow
PROMPTS = [list(range(3, 60)), [5, 17, 200, 33, 7, 401, 12]]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """4-layer checkpoints (so pp=3 splits unevenly) and transformers' answers for them."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in ("llama", "qwen2"):
        path = test_models.write(tmp_path_factory.mktemp(arch), arch, "small", seed=3)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        refs = []
        with torch.no_grad():
            for prompt in PROMPTS:
                tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
                refs.append((tokens, hf(torch.tensor([prompt + tokens])).logits[0]))
        out[arch] = (path, refs)
    return out


@pytest.mark.parametrize(("tp", "pp", "split"), [(1, 2, None), (1, 3, None), (2, 2, None),
                                                 (1, 3, "0.5,3,0.5"), (2, 2, "2.5,1.5")])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_matches_transformers(small, arch, tp, pp, split):
    path, refs = small[arch]
    with LLM(str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp,
             pipeline_split=split) as llm:
        ex = llm.engine.executor
        assert (ex.tp, ex.pp, len(ex.workers)) == (tp, pp, tp * pp)
        if split:
            assert [st.size for st in llm.engine.stages] == [float(s) for s in split.split(",")]
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        for prompt, out, (ref_tokens, ref_logits) in zip(PROMPTS, outs, refs, strict=True):
            assert out.outputs[0].token_ids == ref_tokens
            logits = ex.collective_rpc("prompt_logits", token_ids=prompt + ref_tokens)
            assert all(v is None for r, v in enumerate(logits) if r != ex.driver)
            torch.testing.assert_close(torch.from_numpy(logits[ex.driver].copy()), ref_logits,
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split", ["3,1", "3.5,0.5"])
def test_each_stage_holds_and_reads_only_its_layers(small, split):
    """Weights and KV cache: a stage of layer 3's MLP and the head holds no cache."""
    path, _ = small["qwen2"]
    spec = ModelConfig(str(path)).spec
    parallel = ParallelConfig(1, 2, split)
    with LLM(str(path), pipeline_parallel_size=2, pipeline_split=split) as llm:
        stats = llm.engine.executor.collective_rpc("stats")
    panel = 64 * spec.hidden_size * 4  # a packed head rounds its rows up to whole panels
    for st, s in zip(parallel.stages(spec), stats, strict=True):
        assert s["stage"] == st.index
        planned = weight_bytes_per_device(spec, 1, "float32", stage=st)
        assert planned <= s["weight_bytes"] < planned + panel
        assert s["bytes_read"] <= s["weight_bytes"]
        assert (s["cache_bytes"] > 0) == (st.num_attention > 0)
    whole = weight_bytes_per_device(spec, 1, "float32")
    assert stats[1]["weight_bytes"] < whole / 2  # one layer, the norm and the head


def test_many_sequences_over_two_micro_batches_equal_pp1(small):
    """16 sequences of different lengths, greedy and seeded sampling, a tight cache that
    preempts: pp=2 (two batches in flight) gives what pp=1 gives."""
    path, _ = small["llama"]
    prompts = [[1 + (i * 7 + j) % 500 for j in range(5 + 9 * i)] for i in range(16)]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=20, temperature=0.8, seed=i, ignore_eos=True)
              for i in range(16)]
    results = []
    for pp in (1, 2):
        with LLM(str(path), pipeline_parallel_size=pp, block_size=4, num_blocks=96,
                 max_num_seqs=16, max_num_batched_tokens=64) as llm:
            results.append([o.outputs[0].token_ids for o in
                            llm.generate(prompt_token_ids=prompts, sampling_params=params)])
            assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
            assert not llm.engine.executor.steps_in_flight
    assert results[0] == results[1]


def test_a_failure_sending_the_next_micro_batch_comes_after_this_steps_outputs(small):
    """The next micro-batch goes out before the caller reads a step's outputs; if the group
    fails then, those outputs are still returned and the next step raises the failure."""
    from shardserve.runtime.executor import WorkerError

    path, _ = small["llama"]
    with LLM(str(path), pipeline_parallel_size=2, max_num_seqs=4) as llm:
        engine = llm.engine
        for i in range(4):
            engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=8))
        sent, real = [], engine.executor.submit_step

        def submit(step):
            sent.append(step)
            if len(sent) == 3:  # the first step's early send (two went out at its start)
                raise WorkerError("worker rank 0 died (exit code -9)")
            real(step)

        engine.executor.submit_step = submit
        deltas = engine.step()
        assert len(sent) == 3 and {d.request_id for d in deltas} == {"r0", "r1"}
        assert all(len(d.seqs[0].token_ids) == 1 for d in deltas)
        with pytest.raises(WorkerError, match="rank 0 died"):
            engine.step()


def test_a_stage_that_does_not_fit_is_refused_before_any_worker_starts(small, monkeypatch):
    path, _ = small["llama"]
    spec = ModelConfig(str(path)).spec
    even = ParallelConfig(1, 2).stages(spec)
    budget = max(weight_bytes_per_device(spec, 1, "float32", stage=st) for st in even) + 4096

    def no_spawn(*a, **k):
        raise AssertionError("a worker was started for a split that cannot fit")

    monkeypatch.setattr(llm_engine, "Executor", no_spawn)
    heavy = ParallelConfig(1, 2, "3,1").stages(spec)[0]
    need = weight_bytes_per_device(spec, 1, "float32", stage=heavy)
    with pytest.raises(ValueError) as e:
        LLM(str(path), pipeline_parallel_size=2, pipeline_split="3,1",
            device_memory=str(budget))
    msg = str(e.value)
    assert "stage 0 (layers 0-2)" in msg and f"{need} bytes" in msg and f"{budget} bytes" in msg
    with pytest.raises(ValueError, match="exceeds the model's 4 decoder layers"):
        LLM(str(path), pipeline_parallel_size=9)
    with pytest.raises(ValueError, match="e.g. 5,3 or 7.5,4.5"):
        LLM(str(path), pipeline_parallel_size=2, pipeline_split="2.25,1.75")
    with pytest.raises(ValueError, match="must name 2 stages whose layers sum to"):
        LLM(str(path), pipeline_parallel_size=2, pipeline_split="1,2")
