import torch

from shardserve.layers.sampler import Sampler, SamplingTensors


def _st(n, temperature=1.0, top_k=0, top_p=1.0, seed=None):
    gens = [torch.Generator().manual_seed(seed) if seed is not None else None for _ in range(n)]
    return SamplingTensors([temperature] * n, [top_k] * n, [top_p] * n, gens)


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(Sampler()(logits, _st(4, temperature=0.0)), logits.argmax(-1))


def test_seeded_rows_reproduce_and_top_k_one_is_greedy():
    logits = torch.randn(3, 50)
    a = Sampler()(logits, _st(3, seed=11))
    b = Sampler()(logits, _st(3, seed=11))
    assert torch.equal(a, b)
    assert torch.equal(Sampler()(logits, _st(3, top_k=1, seed=1)), logits.argmax(-1))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[10.0, 9.0, -5.0, -5.0, -5.0]])
    draws = {int(Sampler()(logits, _st(1, top_p=0.5, seed=s))[0]) for s in range(30)}
    assert draws == {0}
    draws = {int(Sampler()(logits, _st(1, top_p=0.99, seed=s))[0]) for s in range(60)}
    assert draws == {0, 1}
