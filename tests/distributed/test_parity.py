"""Parity with Hugging Face transformers on the same random-weight checkpoint, float32.

Tolerances: logits within atol=1e-4, rtol=1e-4 (observed differences are ~3e-7 on logits of
magnitude ~1; the slack covers summation-order changes from the all-reduce), and the 32 greedy
tokens identical. The prompt (57 tokens) plus output is longer than Mistral's test window (32),
so the sliding window is exercised; the llama checkpoint carries Llama-3 RoPE scaling, qwen2
carries QKV bias and tied embeddings; every family uses GQA with 2 KV heads.
"""

import pytest
import torch

from shardserve import LLM, SamplingParams

pytestmark = pytest.mark.slow
PROMPTS = [list(range(3, 60)), [5, 17, 200, 33, 7, 401, 12]]


@pytest.fixture(scope="module")
def references(checkpoints):
    from transformers import AutoModelForCausalLM

    refs = {}
    for arch, path in checkpoints.items():
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        refs[arch] = []
        with torch.no_grad():
            for prompt in PROMPTS:
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
                logits = hf(torch.tensor([prompt + out])).logits[0]
                refs[arch].append((out, logits))
    return refs


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_matches_transformers(checkpoints, references, arch, tp):
    with LLM(str(checkpoints[arch]), tensor_parallel_size=tp, devices=f"cpu:{tp}") as llm:
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(
            max_tokens=32, temperature=0, ignore_eos=True))
        for prompt, out, (ref_tokens, ref_logits) in zip(PROMPTS, outs, references[arch],
                                                         strict=True):
            assert out.outputs[0].token_ids == ref_tokens
            logits = llm.engine.executor.collective_rpc(
                "prompt_logits", token_ids=prompt + ref_tokens)[0]
            torch.testing.assert_close(torch.from_numpy(logits.copy()), ref_logits,
                                       atol=1e-4, rtol=1e-4)
