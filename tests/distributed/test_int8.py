"""int8 weight-only quantization against the float32 model it comes from, tp=1 and tp=2.

The rule: the perplexity int8 gives a fixed token stream is within 1% of float32's, on two
streams of the test model (float32's own greedy continuation of a prompt, scored from the
first generated token, and a fixed random stream); greedy agreement (tokens equal up to the
first difference) is reported, not asserted: a random-weight model has near-ties int8 may
round either way. The test proves it can fail: the same model with its weights rounded to 4
bits per channel (served in float32) moves perplexity by more than 1%.
"""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shardserve import LLM, SamplingParams, test_models
from shardserve.config import ModelConfig
from shardserve.kernels import ops
from shardserve.planner.memory import weight_bytes_per_device

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ops.available(), reason="native kernels do not build here")]
PROMPT = [5, 17, 200, 33, 7, 401, 12, 9, 9, 100]
GREEDY = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)


def _round_weights(path, bits: int):
    """Round every matrix of the checkpoint to ``bits`` bits (symmetric, per output
    channel), stored back in float32."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    top = 2 ** (bits - 1) - 1
    for name, t in tensors.items():
        if t.dim() == 2:
            scale = t.abs().amax(1, keepdim=True).clamp_min(1e-12) / top
            tensors[name] = (torch.round(t / scale).clamp(-top, top) * scale).contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for arch in ("llama", "qwen2"):  # untied head (vocab not whole panels) / tied embedding
        out[arch] = test_models.write(root / arch, arch, "small", seed=3)
    out["llama-4bit"] = _round_weights(test_models.write(root / "l4", "llama", "small", seed=3),
                                       4)
    return out


def _run(path, tp: int, quantization: str | None, streams: list[list[int]] | None = None):
    with LLM(str(path), tensor_parallel_size=tp, devices=f"cpu:{tp}",
             quantization=quantization) as llm:
        label = llm.engine.precision.label
        greedy = llm.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY)[0]
        tokens = greedy.outputs[0].token_ids
        streams = streams or [PROMPT + tokens, list(np.random.default_rng(0).integers(3, 900, 64))]
        ppl = [_perplexity(llm, s, len(PROMPT) if i == 0 else 1) for i, s in enumerate(streams)]
        stats = llm.engine.executor.collective_rpc("stats")
    return label, tokens, streams, ppl, stats


def _perplexity(llm: LLM, stream: list[int], start: int) -> float:
    """exp(mean negative log-likelihood) of ``stream[start:]``, each token given the ones
    before it."""
    logits = torch.from_numpy(llm.engine.executor.collective_rpc(
        "prompt_logits", token_ids=[int(t) for t in stream])[0].copy())
    logp = torch.log_softmax(logits[start - 1:-1].double(), -1)
    nll = -logp.gather(1, torch.tensor(stream[start:]).unsqueeze(1)).mean()
    return math.exp(float(nll))


def _agreed(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_perplexity_within_1_percent_of_float32(models, arch, tp, record_property):
    path = models[arch]
    label32, tokens32, streams, ppl32, stats32 = _run(path, tp, None)
    label8, tokens8, _, ppl8, stats8 = _run(path, tp, "int8", streams)
    assert label8 == "native-int8/float32" and label32.endswith("float32")
    for p32, p8 in zip(ppl32, ppl8, strict=True):
        assert abs(p8 / p32 - 1) < 0.01, (ppl32, ppl8)
    agree = _agreed(tokens32, tokens8)
    record_property("greedy_agreement", f"{agree}/{len(tokens32)}")
    print(f"{arch} tp={tp}: perplexity float32 {ppl32} int8 {ppl8}; greedy tokens agree "
          f"{agree}/{len(tokens32)}")
    # the weights a rank holds: about a quarter of float32's for the quantized layers
    spec = ModelConfig(str(path)).spec
    for s32, s8 in zip(stats32, stats8, strict=True):
        assert s8["weight_bytes"] < 0.45 * s32["weight_bytes"]
        planned = weight_bytes_per_device(spec, tp, "float32", "float32", "int8")
        assert abs(s8["weight_bytes"] - planned) <= 4 * 64 * spec.hidden_size  # panel padding


def test_the_rule_can_fail(models):
    """4-bit weights (per channel, served in float32) break the 1% rule on the same model:
    the test above measures something int8 could get wrong."""
    _, _, streams, ppl32, _ = _run(models["llama"], 1, None)
    _, _, _, ppl4, _ = _run(models["llama-4bit"], 1, None, streams)
    assert max(abs(p4 / p32 - 1) for p32, p4 in zip(ppl32, ppl4, strict=True)) > 0.01, (
        ppl32, ppl4)


def test_int8_makes_a_model_fit_that_did_not(models):
    path = models["llama"]
    spec = ModelConfig(str(path)).spec
    f32 = weight_bytes_per_device(spec, 1, "float32")
    budget = str(int(f32 * 0.6))  # int8 weights and a small KV cache; not float32's weights
    small = dict(device_memory=budget, max_model_len=256, max_num_seqs=2,
                 max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="float32 weights per device"):
        LLM(str(path), **small)
    with LLM(str(path), quantization="int8", **small) as llm:
        out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
            max_tokens=4, temperature=0, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 4
