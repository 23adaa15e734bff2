"""Admission checks: every sampling field has a type and a range, model-bound checks know the
vocabulary, context and tokenizer, and each refusal names its field."""

import math

import pytest

from shardserve import SamplingParams
from shardserve.engine.errors import InvalidRequest
from shardserve.engine.validation import check_generation, check_inputs

BAD = [
    ({"temperature": math.inf}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"top_k": "5"}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 11}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": "x"}, "seed"),
    ({"seed": 2**63 - 1, "n": 2}, "seed"), ({"seed": 1.5}, "seed"),
    ({"n": 0}, "n"), ({"n": True}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"stop": ["x"] * 33}, "stop"), ({"stop": ["x" * 1025]}, "stop"), ({"stop": [""]}, "stop"),
    ({"stop": [3]}, "stop"), ({"stop": 7}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=lambda x: str(x)[:40])
def test_each_bad_sampling_value_names_its_field(kwargs, field):
    with pytest.raises(InvalidRequest, match=f"^{field} must be") as e:
        SamplingParams(**kwargs)
    assert e.value.param == field
    assert len(str(e.value)) < 200  # a long value is not echoed whole


def test_limits_are_accepted_and_tiny_temperatures_are_greedy():
    p = SamplingParams(temperature=1e-40, top_k=-1, seed=2**63 - 2, n=2, top_p=1e-50,
                       repetition_penalty=0.01, stop=["x"] * 32)
    wire = p.to_wire()
    assert p.greedy and wire["temperature"] == 0.0 and wire["top_k"] == 0
    assert SamplingParams(seed=-(2**63)).to_wire()["seed"] == -(2**63)
    assert not SamplingParams(temperature=1e-5).greedy


def _gen(ids, vocab=100, context=64, tokenizer=True, **kw):
    check_generation(ids, SamplingParams(**kw), vocab, context, tokenizer)


@pytest.mark.parametrize("ids,kwargs,field", [
    ([], {}, "prompt"), ([100], {}, "prompt"), ([-1], {}, "prompt"), ([True], {}, "prompt"),
    ([1] * 64, {}, "prompt"), ([1], {"max_tokens": 65}, "max_tokens"),
    ([1], {"top_k": 101}, "top_k"), ([1], {"stop_token_ids": [100]}, "stop_token_ids"),
    ([1], {"stop": ["x"], "tokenizer": False}, "stop"),
])
def test_model_bound_checks_name_the_field(ids, kwargs, field):
    with pytest.raises(InvalidRequest) as e:
        _gen(ids, **kwargs)
    assert e.value.param == field


def test_encoder_inputs_are_checked_and_cut_only_when_asked():
    assert check_inputs([[1, 2, 3]], 10, 2, truncate=True) == [[1, 2]]
    for bad in ([[99999999]], [[-1]], [[]], [[1, 2, 3]]):
        with pytest.raises(InvalidRequest, match="input 0"):
            check_inputs(bad, 10, 2)


@pytest.mark.parametrize("bad", [[], [-1], ["3"], [1.5], "5", [True]])
def test_allowed_token_ids_must_be_token_ids(bad):
    with pytest.raises(InvalidRequest, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=bad)


@pytest.mark.parametrize("bad", [[[]], [1, 2], [[1], [-1]], [[1]] * 17, "ab"])
def test_prefix_allowed_token_ids_must_be_lists_of_token_ids(bad):
    with pytest.raises(InvalidRequest, match="prefix_allowed_token_ids"):
        SamplingParams(prefix_allowed_token_ids=bad)


def test_allowed_token_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(InvalidRequest, match=r"allowed_token_ids must be in 0\.\.99"):
        check_generation([1, 2], SamplingParams(allowed_token_ids=[5, 100]), 100, 64, True)
    with pytest.raises(InvalidRequest, match=r"prefix_allowed_token_ids must be in 0\.\.99"):
        check_generation([1, 2], SamplingParams(prefix_allowed_token_ids=[[5], [3, 100]]),
                         100, 64, True)
    assert SamplingParams(allowed_token_ids=[9, 2, 9]).to_wire()["allowed"] == [2, 9]
