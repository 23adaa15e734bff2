import pytest
import torch

from shardserve.layers.sampler import RowState, Sampler
from shardserve.sampling_params import SamplingParams


def _rows(n, tokens=(1, 2), prompt_len=1, seed=None, **kw):
    params = SamplingParams(**kw).to_wire()
    return [RowState(params, torch.Generator().manual_seed(seed) if seed is not None else None,
                     list(tokens), prompt_len) for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(Sampler()(logits, _rows(4, temperature=0.0)).token_ids,
                       logits.argmax(-1))


def test_one_pass_argmax_matches_torch():
    """``ops.row_argmax`` (the greedy rows' and the finiteness check's one pass): the first
    index of the maximum as torch.argmax, max and min exact; a NaN row is flagged, an infinite
    one reported as such; widths not a multiple of the vector width."""
    from shardserve.kernels import ops

    x = torch.randn(9, 1003)
    x[1, :] = 2.5  # all tied: index 0
    x[2, 7] = x[2, 900] = 50.0  # tie: the first
    x[3, 1002] = 60.0  # in the tail past the last whole vector
    x[4, 10] = float("nan")
    x[5, 20] = float("inf")
    x[6, 30] = float("-inf")
    x[7, :] = float("-inf")  # nothing larger than the first
    x[8, 5] = -0.0  # a signed zero ties with +0.0: the first
    x[8, 6] = x[8, 1000] = 0.0
    x[8, :5] = x[8, 7:1000] = x[8, 1001:] = -1.0
    got = ops.row_argmax(x)
    if got is None:
        pytest.skip("the native kernels do not build here")
    idx, hi, lo = got
    ok = [r for r in range(9) if r != 4]
    assert torch.equal(idx[ok], x[ok].argmax(-1)) and idx[2] == 7 and idx[3] == 1002
    assert torch.equal(hi[ok], x[ok].amax(-1)) and torch.equal(lo[ok], x[ok].amin(-1))
    assert idx[4] == -1 and hi[4].isnan() and lo[4].isnan()
    strided = torch.randn(1003, 4).t()  # not contiguous: copied first
    assert torch.equal(ops.row_argmax(strided)[0], strided.argmax(-1))
    result = Sampler()(x.clone(), _rows(9, temperature=0.0))
    assert idx[7] == 0 and idx[8] == 5
    assert set(result.failed) == {4, 5, 6, 7} and result.token_ids[0] == x[0].argmax()


def test_seeded_rows_reproduce_and_top_k_one_is_greedy():
    logits = torch.randn(3, 50)
    a = Sampler()(logits, _rows(3, seed=11)).token_ids
    b = Sampler()(logits, _rows(3, seed=11)).token_ids
    assert torch.equal(a, b)
    assert torch.equal(Sampler()(logits, _rows(3, top_k=1, seed=1)).token_ids,
                       logits.argmax(-1))


def test_top_p_and_min_p_keep_only_the_likely_tokens():
    logits = torch.tensor([[10.0, 9.0, -5.0, -5.0, -5.0]])
    draws = {int(Sampler()(logits, _rows(1, top_p=0.5, seed=s)).token_ids[0])
             for s in range(30)}
    assert draws == {0}
    draws = {int(Sampler()(logits, _rows(1, top_p=0.99, seed=s)).token_ids[0])
             for s in range(60)}
    assert draws == {0, 1}
    draws = {int(Sampler()(logits, _rows(1, min_p=0.5, seed=s)).token_ids[0])
             for s in range(30)}
    assert draws == {0}  # token 1 has e^-1 = 0.37 of token 0's probability


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    # token 0 was generated (output = tokens after the prompt): presence penalty pushes it down
    rows = _rows(1, tokens=(2, 0), prompt_len=1, temperature=0.0, presence_penalty=0.5)
    assert int(Sampler()(logits.clone(), rows).token_ids[0]) == 1
    rows = _rows(1, tokens=(2, 0, 0), prompt_len=1, temperature=0.0, frequency_penalty=0.06)
    assert int(Sampler()(logits.clone(), rows).token_ids[0]) == 1  # 2.0 - 2*0.06 < 1.9
    rows = _rows(1, tokens=(0,), prompt_len=1, temperature=0.0, repetition_penalty=1.2)
    assert int(Sampler()(logits.clone(), rows).token_ids[0]) == 1  # 2.0/1.2 < 1.9


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(2, 10)
    res = Sampler()(logits.clone(), _rows(2, temperature=0.0, logprobs=3,
                                          repetition_penalty=1.5))
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(res.logprobs, logp.gather(1, res.token_ids[:, None])[:, 0])
    torch.testing.assert_close(res.top_logprobs, logp.topk(3, -1).values)


def test_a_row_without_usable_numbers_fails_alone():
    logits = torch.randn(4, 50)
    logits[1, 7] = float("nan")  # e.g. an overflow in this sequence's activations
    logits[2] = float("-inf")  # nothing left to sample from
    rows = _rows(2, temperature=0.0) + _rows(2, temperature=1.0, seed=3)
    res = Sampler()(logits.clone(), rows)
    assert set(res.failed) == {1, 2} and res.token_ids[1] == res.token_ids[2] == -1
    assert res.token_ids[0] == logits[0].argmax()
    alone = Sampler()(logits[3:].clone(), _rows(1, temperature=1.0, seed=3))
    assert res.token_ids[3] == alone.token_ids[0]  # the others are unaffected


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    logits = torch.randn(3, 50)
    res = Sampler()(logits, _rows(3, top_p=1e-50, seed=1))
    assert not res.failed and torch.equal(res.token_ids, logits.argmax(-1))


@pytest.mark.parametrize("native", [True, False])
def test_inverse_cdf_draws_follow_the_weights(native):
    """The sampler's draw (native kernel, or its PyTorch twin): each index at its weight's
    share, never a zero weight, -1 for a row with nothing to draw from."""
    from shardserve.kernels import ops
    from shardserve.layers.sampler import _inverse_cdf

    draw = ops.sample_rows if native else _inverse_cdf
    if native and ops.sample_rows(torch.ones(1, 2), torch.zeros(1, dtype=torch.float64)) is None:
        pytest.skip("no C compiler: the PyTorch twin runs")
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0, 6.0, 0.0])  # shares 0.1, 0.3, 0.6
    n = 20000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = draw(weights.expand(n, -1).contiguous(), u)
    counts = torch.bincount(got, minlength=7).double() / n
    assert counts[[0, 2, 4, 6]].sum() == 0
    torch.testing.assert_close(counts[[1, 3, 5]], torch.tensor([0.1, 0.3, 0.6],
                                                               dtype=torch.float64), atol=0.015,
                               rtol=0)
    edge = torch.tensor([0.0, 1.0 - 2.0 ** -53], dtype=torch.float64)  # the ends of [0, 1)
    assert draw(weights.expand(2, -1).contiguous(), edge).tolist() == [1, 5]
    bad = torch.tensor([[0.0, 0.0], [float("nan"), 1.0], [float("inf"), 1.0], [0.5, 0.5]])
    assert draw(bad, torch.full((4,), 0.75, dtype=torch.float64)).tolist() == [-1, -1, -1, 1]
    big = torch.rand(3, 50000, generator=torch.Generator().manual_seed(1))  # a vocabulary row
    us = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.equal(draw(big, us), _inverse_cdf(big, us))


def test_native_draw_from_logits_is_the_softmax_draw():
    """Rows without filters draw from the logits in one native pass: the same token as
    the inverse CDF of softmax(logits / T) for the same uniform (but where the two roundings
    of a token's weight straddle the target), at the softmax's frequencies."""
    from shardserve.kernels import ops
    from shardserve.layers.sampler import _inverse_cdf

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32000, generator=g) * 3
    temps = torch.linspace(0.2, 2.0, 64)
    u = torch.rand(64, dtype=torch.float64, generator=g)
    got = ops.sample_logits(logits, logits.amax(-1), temps, u)
    if got is None:
        pytest.skip("no C compiler: the softmax path runs")
    want = _inverse_cdf(torch.softmax(logits / temps[:, None], -1), u)
    assert (got == want).sum() >= 62
    small = torch.tensor([[0.0, 2.0, -1e9, 1.0]])  # exp(-1e9) is no weight at all
    n = 20000
    u = torch.rand(n, dtype=torch.float64, generator=g)
    draws = ops.sample_logits(small.expand(n, -1).contiguous(), torch.full((n,), 2.0),
                              torch.ones(n), u)
    freq = torch.bincount(draws, minlength=4).double() / n
    assert freq[2] == 0
    torch.testing.assert_close(freq, torch.softmax(small[0].double(), -1), atol=0.015, rtol=0)
