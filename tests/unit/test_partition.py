"""Pipeline splits in half layers (planner/partition.py): the balanced split, explicit splits,
what each stage holds, and the planner's bytes for a stage that ends inside a layer."""

import pytest

from shardserve.planner.memory import (
    block_weights,
    decode_kv_tokens,
    kv_bytes_per_token,
    weight_params_per_device,
)
from shardserve.planner.partition import BlockWeights, Stage, parse_split, split_layers
from shardserve.planner.presets import preset


def test_a_stage_names_what_it_holds():
    a, b = split_layers(12, 2, (7.5, 4.5))
    assert (a.start, a.stop, b.start, b.stop) == (0, 15, 15, 24)
    assert a.name == "stage 0 (layers 0-6, layer 7's attention)"
    assert b.name == "stage 1 (layer 7's MLP, layers 8-11)"
    assert list(a.layers) == list(range(8)) and list(b.layers) == list(range(7, 12))
    assert (a.num_attention, a.num_mlp, b.num_attention, b.num_mlp) == (8, 7, 4, 5)
    assert (a.size, b.size) == (7.5, 4.5)
    lone = split_layers(4, 3, (0.5, 3, 0.5))
    assert [s.holds for s in lone] == ["layer 0's attention", "layer 0's MLP, layers 1-2, "
                                       "layer 3's attention", "layer 3's MLP"]
    assert Stage.whole(4).holds == "layers 0-3" and split_layers(4, 2, (3, 1))[1].holds == "layer 3"


@pytest.mark.parametrize(("text", "want"), [("5,3", (5, 3)), ("7.5,4.5", (7.5, 4.5)),
                                            ([5, 3], (5, 3)), ([0.5, 3.5], (0.5, 3.5)),
                                            (None, None), ("", None)])
def test_parse_split(text, want):
    assert parse_split(text) == want


@pytest.mark.parametrize("bad", ["5;3", "2.25,1.75", "0,4", "-1,5", "a,b", [True, 3]])
def test_a_bad_split_says_how_to_write_one(bad):
    with pytest.raises(ValueError, match="e.g. 5,3 or 7.5,4.5"):
        parse_split(bad)


def test_the_balanced_split_evens_the_heaviest_stage():
    # equal blocks, no head: halves of the model
    assert [s.size for s in split_layers(12, 2)] == [6, 6]
    assert [s.size for s in split_layers(5, 2)] == [2.5, 2.5]
    # a heavy head: the last stage holds fewer layers, and a boundary may fall in a layer
    w = BlockWeights(attention=1.0, mlp=3.0, head=16.0)  # a layer weighs 4, the head 4 layers
    sizes = [s.size for s in split_layers(12, 2, None, w)]
    assert sizes == [8, 4]
    w = BlockWeights(attention=1.5, mlp=3.0, head=12.0)  # halves: 7.5 + 4.5 = 34.5 / 34.5
    assert [s.size for s in split_layers(12, 2, None, w)] == [7.5, 4.5]
    # every stage takes at least one block; pp up to twice the layers
    assert [s.size for s in split_layers(2, 4)] == [0.5] * 4
    with pytest.raises(ValueError, match="exceeds the model's 2 decoder layers"):
        split_layers(2, 5)
    with pytest.raises(ValueError, match="must name 2 stages whose layers sum to"):
        split_layers(12, 2, (7.5, 5))


def test_the_kv_cache_a_step_reads_moves_the_split_towards_even_layers():
    spec = preset("llama-3-8b")  # its head weighs 2.4 layers
    light = split_layers(spec.num_layers, 4, None, block_weights(spec, 0))
    heavy = split_layers(spec.num_layers, 4, None, block_weights(
        spec, decode_kv_tokens(256, 4, 4096)))
    assert sum(s.size for s in light) == sum(s.size for s in heavy) == spec.num_layers
    assert light[-1].size < heavy[-1].size  # the head matters less once attention dominates
    w = block_weights(spec, decode_kv_tokens(256, 4, 4096))

    def heaviest(stages):
        return max(s.num_attention * w.attention + s.num_mlp * w.mlp + s.is_last * w.head
                   for s in stages)

    assert heaviest(heavy) < heaviest(light)
    assert heaviest(heavy) <= min(heaviest(split_layers(spec.num_layers, 4, sizes))
                                  for sizes in [(8, 8, 8, 8), (8.5, 8.5, 8.5, 6.5),
                                                (9, 8, 8, 7), (8, 8.5, 8.5, 7)])


def test_planned_bytes_of_half_stages_add_up_to_the_whole_model():
    spec = preset("llama-3-8b")
    whole = weight_params_per_device(spec, 2)
    for split in [(16, 16), (15.5, 16.5), (0.5, 31.5), (10.5, 11, 10.5)]:
        stages = split_layers(spec.num_layers, len(split), split)
        params = [weight_params_per_device(spec, 2, stage=s) for s in stages]
        # the embedding on the first stage and a tied head aside, the stages add up
        assert sum(params) == whole
        kv = sum(kv_bytes_per_token(spec, 2, "bfloat16", s) for s in stages)
        assert kv == kv_bytes_per_token(spec, 2, "bfloat16")
