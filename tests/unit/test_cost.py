"""The cost model and the plan search, pure: predictions against hand calculations from the
profiles' figures, the 175B case on 12-chip machines, and the SLO picker."""

import types

import numpy as np
import pytest

from shardserve.bench.calibrate import nnls
from shardserve.config import SchedulerConfig
from shardserve.planner import cost, search
from shardserve.planner.hardware import profile
from shardserve.planner.memory import linear_params_per_device
from shardserve.planner.partition import Stage
from shardserve.planner.presets import preset


def _precision(dtype="bfloat16", quantization=None):
    return types.SimpleNamespace(weights=dtype, compute=dtype, kv=dtype,
                                 quantization=quantization)


def _nodes(name, count=1):
    hw = profile(name)
    return search.Nodes(tuple(f"{hw.kind}:{i}" for i in range(hw.devices_per_node)),
                        hw.memory_per_device, count, hw.rates)


def test_batch_one_decode_on_a_gpu_is_its_weights_over_the_memory_bandwidth():
    """Llama-3-8B in bfloat16 on one H100: the roofline reads every weight once a token
    (memory-bound at one row) plus the sequence's KV cache; no measured overheads."""
    spec = preset("llama-3-8b")
    rates = profile("h100-8x").rates(1)
    attn, mlp, head = linear_params_per_device(spec, 1)
    layer = attn + mlp
    bw = 3120 * 2**30  # bytes/s, the profile's figure
    ctx = 512 + 64
    kv = spec.num_layers * ctx * 2 * spec.num_kv_heads * spec.head_dim * 2
    hand = ((spec.num_layers * layer + head) * 2 + kv) / bw
    p = cost.predict(spec, 1, [Stage.whole(spec.num_layers)], "bfloat16", "bfloat16", rates,
                     batch=1, prompt_len=512, output_len=128)
    assert p.decode_ms == pytest.approx(hand * 1e3, rel=1e-9)
    assert 4.0 < p.decode_ms < 6.0  # 16 GB at 3.35 TB/s
    # a 512-token prefill is compute-bound: 2 FLOPs a weight a token at 989 TFLOP/s
    flops = 2 * 512 * spec.num_layers * layer + 2 * head
    assert p.prefill_ms > flops / 989.4e12 * 1e3
    # tp=2 halves each device's weights, and adds NVLink all-reduces
    p2 = cost.predict(spec, 2, [Stage.whole(spec.num_layers)], "bfloat16", "bfloat16",
                      rates, batch=1, prompt_len=512, output_len=128)
    assert 0.5 * p.decode_ms < p2.decode_ms < 0.6 * p.decode_ms


def test_measured_curve_interpolates_and_factors_scale_it():
    rates = cost.Rates(linear_ps={"float32": {1: 100.0, 16: 200.0, 64: 600.0}},
                       overhead={"float32": {**dict.fromkeys(cost.OVERHEAD_TERMS, 0.0),
                                             "linear_memory_factor": 1.5,
                                             "linear_compute_factor": 1.0}})
    assert rates.ps_per_weight("float32", 1) == 100.0
    assert rates.ps_per_weight("float32", 40) == pytest.approx(400.0)
    assert rates.ps_per_weight("float32", 128) == pytest.approx(600 + 64 * 400 / 48)  # on
    assert rates.ps_per_weight("bfloat16", 16) == 200.0  # unmeasured 16-bit: float32's curve
    with pytest.raises(ValueError, match="no rate for int8"):
        rates.ps_per_weight("int8", 1)
    spec = preset("llama-3-8b")
    shape = cost.StepShape("decode", 16, 100)
    memory, more = cost.linear_parts(spec, 1, "float32", None, shape, rates)
    attn, mlp, head = linear_params_per_device(spec, 1)
    layer = attn + mlp
    assert memory == pytest.approx((spec.num_layers * layer + head) * 100e-12)
    assert more == pytest.approx((spec.num_layers * layer + head) * 100e-12)
    assert cost.linear_s(spec, 1, "float32", None, shape, rates) == \
        pytest.approx(1.5 * memory + more)


def test_nnls_keeps_costs_non_negative_and_recovers_them():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (30, 3))
    truth = np.array([2.0, 0.0, 0.5])
    y = a @ truth + 1.0
    (x,) = nnls(np.column_stack([a, np.ones(30)]), y, 1 / y)
    assert (x >= 0).all() and x == pytest.approx([2.0, 0.0, 0.5, 1.0], abs=1e-9)
    (x,) = nnls(a[:, :1], -a[:, 0])  # a negative cost is dropped, never fitted
    assert x[0] == 0.0


def test_175b_fits_one_inf2_48xlarge_at_tp12_and_needs_two_smaller_nodes():
    spec, sched = preset("opt-175b"), SchedulerConfig()
    target = search.Target(concurrency=8, prompt_len=512, output_len=128)
    big = search.candidates(spec, _nodes("inf2.48xlarge"), _precision(), sched, target,
                            spec.max_position)
    fitting = {(c["tp"], c["pp"]): c for c in big if c["fits"]}
    assert all(tp * pp == 12 for tp, pp in fitting)  # every chip: 350 GB over 384 GiB
    one = fitting[(12, 1)]
    assert one["bytes_per_device"]["weights"] < 32 << 30 and one["kv_tokens"] >= 2048
    assert one["predicted"]["tpot_ms"] > 0 and one["replicas"] == 1 and one["nodes"] == 1
    chosen = big[search.choose(big)]  # of those, the fastest
    assert chosen["predicted"]["tokens_per_s"] == max(
        c["predicted"]["tokens_per_s"] for c in fitting.values())
    small = search.candidates(spec, _nodes("inf2.24xlarge"), _precision(), sched, target,
                              spec.max_position)
    assert not any(c["fits"] for c in small) and search.choose(small) is None
    two = search.candidates(spec, _nodes("inf2.24xlarge", 2), _precision(), sched, target,
                            spec.max_position)
    chosen = two[search.choose(two)]
    assert (chosen["tp"], chosen["pp"], chosen["nodes"]) == (6, 2, 2)
    assert {s["node"] for s in chosen["stages"]} == {0, 1}
    best = search.smallest_hardware(spec, _precision(), sched, target, spec.max_position)
    assert best["total_memory"] >= 350e9 and (best["hardware"], best["nodes"]) in {
        ("inf2.48xlarge", 1), ("inf2.24xlarge", 2), ("h100-8x", 1), ("h200-8x", 1)}


def test_slo_picker_takes_tp2_when_tp1_misses_the_tpot_slo():
    spec, sched = preset("llama-3-8b"), SchedulerConfig()
    nodes = _nodes("h100-8x")
    loose = search.candidates(spec, nodes, _precision(), sched, search.Target(), 8192)
    by_split = {(c["tp"], c["pp"]): c for c in loose}
    tp1, tp2 = by_split[(1, 1)]["predicted"], by_split[(2, 1)]["predicted"]
    assert tp2["tpot_ms"] < tp1["tpot_ms"]
    assert loose[search.choose(loose)]["tp"] == 1  # cheapest when nothing is asked
    slo = (tp1["tpot_ms"] + tp2["tpot_ms"]) / 2
    strict = search.candidates(spec, nodes, _precision(), sched,
                               search.Target(slo_tpot_ms=slo), 8192)
    chosen = strict[search.choose(strict)]
    assert (chosen["tp"], chosen["pp"]) == (2, 1) and chosen["meets_slo"]
    assert not next(c for c in strict if (c["tp"], c["pp"]) == (1, 1))["meets_slo"]
    impossible = search.candidates(spec, nodes, _precision(), sched,
                                   search.Target(slo_tpot_ms=0.001), 8192)
    assert search.choose(impossible) is None


def test_pipeline_prediction_overlaps_micro_batches():
    """With pp stages and a batch of at least pp, the slowest stage sets the pace; at batch
    one a token goes through every stage in turn."""
    spec = preset("llama-2-70b")
    rates = profile("h100-8x").rates(8)
    whole = [Stage.whole(spec.num_layers)]
    halves = [Stage(0, 2, 0, 80), Stage(1, 2, 80, 160)]  # in half layers
    one = cost.predict(spec, 4, whole, "bfloat16", "bfloat16", rates, 1, 128, 128)
    two = cost.predict(spec, 4, halves, "bfloat16", "bfloat16", rates, 1, 128, 128)
    assert two.decode_ms == pytest.approx(one.decode_ms, rel=0.05)  # serial at batch 1
    b1 = cost.predict(spec, 4, whole, "bfloat16", "bfloat16", rates, 64, 128, 128)
    b2 = cost.predict(spec, 4, halves, "bfloat16", "bfloat16", rates, 64, 128, 128)
    assert b2.tokens_per_s > b1.tokens_per_s  # half the weights a device, both busy


def test_target_refuses_nonsense():
    with pytest.raises(ValueError, match="--prompt-len 0"):
        search.Target(prompt_len=0)
    with pytest.raises(ValueError, match="--batch 0"):
        search.Target(batch=0)
