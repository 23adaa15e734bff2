"""Worker processes live and die with their deployment: no orphans, clear errors."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shardserve import LLM, SamplingParams
from shardserve.runtime.executor import WorkerError

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_die_when_the_parent_is_killed(checkpoints):
    script = textwrap.dedent(f"""
        import sys, time
        from shardserve import LLM
        llm = LLM({str(checkpoints["llama"])!r}, tensor_parallel_size=2)
        print(" ".join(str(w.proc.pid) for w in llm.engine.executor.workers), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "workers outlived their killed parent"


def test_a_dead_worker_is_reported_not_hung(checkpoints):
    llm = LLM(str(checkpoints["qwen2"]), tensor_parallel_size=2)
    try:
        victim = llm.engine.executor.workers[1].proc
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        with pytest.raises(WorkerError, match="rank 1 .*died"):
            llm.generate(prompt_token_ids=[[1, 2, 3]],
                         sampling_params=SamplingParams(max_tokens=4))
    finally:
        llm.close()
    assert all(not _alive(w.proc.pid) for w in llm.engine.executor.workers)


def test_per_request_params_and_seeded_sampling(checkpoints):
    with LLM(str(checkpoints["mistral"]), tensor_parallel_size=2) as llm:
        prompts = [[1, 5, 9], [1, 7, 7, 7, 2]]
        params = [SamplingParams(max_tokens=3, temperature=0, ignore_eos=True),
                  SamplingParams(max_tokens=6, temperature=1.0, seed=42, ignore_eos=True)]
        a = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        assert [len(o.outputs[0].token_ids) for o in a] == [3, 6]
        alone = llm.generate(prompt_token_ids=prompts[1:], sampling_params=params[1:])
        # a seeded request samples the same tokens whatever it is batched with
        assert alone[0].outputs[0].token_ids == a[1].outputs[0].token_ids
        with pytest.raises(ValueError, match="give one, or one per prompt"):
            llm.generate(prompt_token_ids=prompts, sampling_params=params[:1])
        with pytest.raises(ValueError, match="context is 1024 tokens"):
            llm.generate(prompt_token_ids=[[1] * 1024])
