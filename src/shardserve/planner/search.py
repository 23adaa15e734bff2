"""Candidate plans for one model on some nodes: every tp x pp that places, each stage's bytes
per device, the KV capacity, predicted TTFT / TPOT / throughput (``planner/cost.py``), and the
pick: the cheapest plan (fewest devices a replica) that fits and meets the SLOs.

Placement rules, as the executors place: a tensor-parallel group stays inside one node (tp
divides the devices of a node), pipeline stages take tp groups in node order and may span
nodes, and replicas of the plan fill the nodes (``replicas = tp groups // pp``). Pure: the
rates come in as a function, nothing is measured here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from shardserve.planner import cost
from shardserve.planner.memory import (
    block_weights,
    decode_kv_tokens,
    stage_bytes,
    weight_bytes_per_device,
)
from shardserve.planner.partition import Stage, split_layers
from shardserve.planner.recsys import plan_tables
from shardserve.planner.specs import DLRMSpec, EncoderSpec, TransformerSpec, WhisperSpec


@dataclass(frozen=True)
class Target:
    """The operating point predicted, and the service levels a plan must meet."""

    concurrency: int = 1  # requests in flight over all replicas
    batch: int | None = None  # sequences a replica's decode step runs (default: concurrency
    # shared by the replicas, capped by max_num_seqs and the KV capacity)
    prompt_len: int = 512
    output_len: int = 128
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("concurrency", "prompt_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be "
                                 ">= 1")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"--batch {self.batch}: must be >= 1")


@dataclass(frozen=True)
class Nodes:
    """``count`` machines of ``devices`` each (device names), every device with ``budget``
    bytes; ``rates(n)`` is what one device does while n devices of a node are in use (None
    where this hardware was never measured nor described)."""

    devices: tuple[str, ...]
    budget: int
    count: int = 1
    rates: Callable[[int], cost.Rates | None] = lambda n: None

    @property
    def per_node(self) -> int:
        return len(self.devices)


def plan(spec: TransformerSpec, tp: int, pp: int, nodes: Nodes, precision, sched,
         target: Target, context: int, split: tuple[int, ...] | None = None) -> dict:
    """One candidate: ``tp x pp`` on ``nodes`` (see the module's docstring for the keys)."""
    dpn = nodes.per_node
    placed = tp <= dpn and dpn % tp == 0 and tp * pp <= nodes.count * dpn
    if isinstance(spec, EncoderSpec):
        return _encoder_plan(spec, tp, nodes, precision, placed)
    if isinstance(spec, DLRMSpec):
        return _recommender_plan(spec, tp, nodes, precision, placed)
    stages = split_layers(spec.num_layers, pp, split, block_weights(
        spec, decode_kv_tokens(sched.max_num_seqs, pp, context)))
    needs = stage_bytes(spec, tp, stages, precision.weights, precision.compute, precision.kv,
                        precision.quantization, sched.max_num_batched_tokens,
                        sched.max_num_seqs)
    rows = []
    for st, need in zip(stages, needs, strict=True):
        row = {"stage": st.index, "layers": [st.layers[0], st.layers[-1]], "holds": st.holds,
               "weight_bytes_per_device": need.weights,
               "activation_bytes_per_device": need.activations,
               "kv_bytes_per_token": need.kv_per_token,
               "kv_tokens_that_fit": need.kv_tokens(nodes.budget)}
        # room for one sequence of the full context beside weights and activations
        row["fits"] = need.weights <= nodes.budget and row["kv_tokens_that_fit"] >= context
        if placed:
            first = st.index * tp
            row["node"] = first // dpn
            row["devices"] = [f"node{(first + j) // dpn}/{nodes.devices[(first + j) % dpn]}"
                              for j in range(tp)]
        rows.append(row)
    fits = placed and all(r["fits"] for r in rows)
    kv_tokens = min(r["kv_tokens_that_fit"] for r in rows)
    heaviest = max(range(pp), key=lambda i: needs[i].weights)
    replicas = (nodes.count * (dpn // tp)) // pp if placed else 0
    out = {"tp": tp, "pp": pp, "nodes": -(-tp * pp // dpn) if placed else None,
           "replicas": replicas, "fits": fits, "placed": placed,
           "bytes_per_device": {"weights": needs[heaviest].weights,
                                "kv": kv_tokens * needs[heaviest].kv_per_token,
                                "activations": needs[heaviest].activations},
           "kv_tokens": kv_tokens, "stages": rows, "predicted": None, "batch": None,
           "meets_slo": None}
    if not placed:
        out["why"] = (f"tp={tp} x pp={pp} does not place on {nodes.count} node(s) of {dpn} "
                      "devices (a tp group stays inside one node: tp must divide the devices "
                      "per node)")
    elif not fits:
        bad = next(r for r in rows if not r["fits"])
        out["why"] = (f"stage {bad['stage']}: weights, activations and one full-context "
                      f"sequence of KV cache ({context:,} tokens) exceed the device budget")
    rates = nodes.rates(min(dpn, replicas * tp * pp)) if placed else None
    if fits and rates is not None:
        per_replica = math.ceil(target.concurrency / replicas)
        room = max(1, kv_tokens // (target.prompt_len + target.output_len))
        batch = target.batch or min(per_replica, sched.max_num_seqs, room)
        p = cost.predict(spec, tp, stages, cost.weight_format(precision.weights,
                                                              precision.quantization),
                         precision.kv, rates, batch, target.prompt_len, target.output_len,
                         replicas, [r["node"] for r in rows])
        out["batch"], out["predicted"] = batch, p.as_dict()
        out["meets_slo"] = ((target.slo_ttft_ms is None or p.ttft_ms <= target.slo_ttft_ms)
                            and (target.slo_tpot_ms is None
                                 or p.tpot_ms <= target.slo_tpot_ms))
    return out


def _encoder_plan(spec: EncoderSpec, tp: int, nodes: Nodes, precision, placed: bool) -> dict:
    """An encoder holds weights only (no KV cache), one stage, no decode to predict."""
    need = weight_bytes_per_device(spec, tp, precision.weights)
    return _weights_only(spec, tp, nodes, placed, need, "the weights exceed the device budget")


def _recommender_plan(spec: DLRMSpec, tp: int, nodes: Nodes, precision, placed: bool) -> dict:
    """A DLRM: its tables over ``tp`` devices (table-wise or row-wise), the MLPs on each."""
    tables = plan_tables(spec, tp, precision.weights)
    out = _weights_only(spec, tp, nodes, placed, max(tables.bytes_per_device()),
                        "a device's table shards and dense layers exceed the device budget")
    out["tables"] = [{"table": t, "kind": tables.kind(t), "rows": spec.num_embeddings[t],
                      "ranks": [s.rank for s in tables.shards if s.table == t]}
                     for t in range(spec.num_tables)]
    return out


def _weights_only(spec, tp: int, nodes: Nodes, placed: bool, need: int, why: str) -> dict:
    """A one-stage plan of ``need`` bytes a device and nothing to predict."""
    fits = placed and need <= nodes.budget
    devices = [f"node0/{d}" for d in nodes.devices[:tp]] if placed else []
    return {"tp": tp, "pp": 1, "nodes": 1 if placed else None,
            "replicas": nodes.count * (nodes.per_node // tp) if placed else 0, "fits": fits,
            "placed": placed, "bytes_per_device": {"weights": need, "kv": 0, "activations": 0},
            "kv_tokens": 0, "predicted": None, "batch": None, "meets_slo": None,
            "stages": [{"stage": 0, "layers": [0, spec.num_layers - 1],
                        "holds": Stage.whole(spec.num_layers).holds,
                        "weight_bytes_per_device": need, "activation_bytes_per_device": 0,
                        "kv_bytes_per_token": 0, "kv_tokens_that_fit": 0, "fits": fits,
                        **({"node": 0, "devices": devices} if placed else {})}],
            **({} if fits else {"why": why})}


def pipeline_sizes(groups: int, layers: int) -> list[int]:
    """The pipeline depths worth listing: those that divide the tp groups available (so
    replicas fill them), up to the layer count."""
    return [p for p in range(1, min(groups, layers) + 1) if groups % p == 0]


def candidates(spec: TransformerSpec, nodes: Nodes, precision, sched, target: Target,
               context: int, tp: int | None = None, pp: int | None = None,
               split: tuple[int, ...] | None = None) -> list[dict]:
    """Every tp x pp worth listing (``tp`` / ``pp`` pin one), fewest devices first."""
    dpn = nodes.per_node
    tps = [tp] if tp else [t for t in range(1, dpn + 1) if dpn % t == 0 and spec.tp_ok(t)]
    out = []
    for t in tps:
        groups = nodes.count * (dpn // t) if dpn % t == 0 else 1
        # pipeline stages split a decoder's layers; Whisper's encoder-decoder runs in one
        depths = pipeline_sizes(groups, spec.num_layers) if isinstance(
            spec, TransformerSpec) and not isinstance(spec, WhisperSpec) else [1]
        for p in [pp] if pp else depths:
            out.append(plan(spec, t, p, nodes, precision, sched, target, context,
                            split if pp else None))
    return sorted(out, key=lambda c: (c["tp"] * c["pp"], c["pp"]))


def choose(plans: list[dict]) -> int | None:
    """The index of the cheapest plan that fits and meets the SLOs (fewest devices a
    replica; then the most tokens per second), or None."""
    ok = [i for i, c in enumerate(plans) if c["fits"] and c["meets_slo"] is not False]
    if not ok:
        return None
    speed = lambda i: plans[i]["predicted"]["tokens_per_s"] if plans[i]["predicted"] else 0  # noqa: E731
    return min(ok, key=lambda i: (plans[i]["tp"] * plans[i]["pp"], -speed(i)))



def smallest_hardware(spec: TransformerSpec | EncoderSpec, precision, sched, target: Target,
                      context: int, max_nodes: int = 8) -> dict | None:
    """The shipped hardware profile and node count with the least memory in all on which
    some plan fits (its cheapest such plan), or None when none of up to ``max_nodes`` nodes
    of any does."""
    from shardserve.planner.hardware import profiles

    best = None
    for hw in profiles().values():
        if hw.name == "local":
            continue
        for count in range(1, max(1, max_nodes) + 1):
            total = count * hw.devices_per_node * hw.memory_per_device
            if best and total >= best["total_memory"]:
                break
            nodes = Nodes(tuple(f"{hw.kind}:{i}" for i in range(hw.devices_per_node)),
                          hw.memory_per_device, count)
            fitting = [c for c in candidates(spec, nodes, precision, sched, target, context)
                       if c["fits"]]
            if fitting:
                best = {"hardware": hw.name, "nodes": count, "tp": fitting[0]["tp"],
                        "pp": fitting[0]["pp"], "total_memory": total}
                break
    return best
