"""Step time, TTFT, TPOT and throughput of a decoder at a tp x pp plan: pure arithmetic over
the model's shapes and one device's rates (``Rates``), no measuring here.

A step on one device of one stage takes

    linear    every decoder layer's matrices and (last stage) the LM head, weights x the
              picoseconds a weight costs at that many rows (a measured curve on this machine:
              memory-bound at few rows, compute-bound at many; the roofline of the vendor's
              FLOP/s and bandwidth where nothing was measured);
    all-reduce  tp > 1: two per layer and the embedding's, plus the logits gathered, each
              latency + bytes / bandwidth (fitted to the workers' own collective);
    the rest  a fixed cost per step, per sequence, per sequence and vocabulary entry
              (sampling), per layer, per activation element, per byte of KV cache a decode
              reads and per FLOP of prefill attention: coefficients ``shardserve calibrate``
              fitted to engine steps of probe models (``bench/calibrate.py``); on vendor
              profiles only the KV bytes and attention FLOPs, at peak (a lower bound).

Pipeline stages run one after the other for one micro-batch, a hop between them costs the
hidden state and residual over the link; with ``pp`` micro-batches in flight the slowest
stage sets the pace. Serving at a concurrency ``B`` (per replica): TPOT is a decode step of
B sequences at the middle of their output plus the prefills that arrive meanwhile (B of them
every ``output_len`` steps), TTFT a prefill plus, when others are decoding, half a decode
step (the step in flight when the request arrives), throughput B / TPOT a replica.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from shardserve.planner.memory import DTYPE_BYTES, local_kv_heads, stage_linear_params
from shardserve.planner.partition import Stage
from shardserve.planner.specs import TransformerSpec

# The engine-time coefficients a calibration fits, in the order of ``time_features``, with
# the unit of each (seconds times this; the two linear factors scale the curve's time).
OVERHEAD_TERMS = {"linear_memory_factor": 1.0, "linear_compute_factor": 1.0, "step_us": 1e6,
                  "seq_us": 1e6, "seq_vocab_ps": 1e12, "layer_us": 1e6, "element_ps": 1e12,
                  "kv_byte_ps": 1e12, "attention_flop_ps": 1e12}


@dataclass(frozen=True)
class StepShape:
    kind: str  # "prefill" or "decode"
    seqs: int  # sequences in the step
    length: int  # prefill: each prompt's tokens; decode: each sequence's context

    @property
    def rows(self) -> int:
        """Tokens the step runs through the layers."""
        return self.seqs * self.length if self.kind == "prefill" else self.seqs


@dataclass(frozen=True)
class Rates:
    """What one device of a plan does per unit of work: measured (``linear_ps`` by weight
    format and rows, ``all_reduce``, ``overhead``) or, where a curve is missing, the roofline
    of ``tflops`` and ``memory_gib_s``."""

    linear_ps: dict[str, dict[int, float]] = field(default_factory=dict)
    all_reduce: dict | None = None  # {"latency_us", "gib_s"}
    overhead: dict[str, dict] | None = None  # OVERHEAD_TERMS by KV-cache dtype
    tflops: dict[str, float] = field(default_factory=dict)
    memory_gib_s: float | None = None
    link_gib_s: float | None = None  # between devices of a node (all-reduce, stage hops)
    link_latency_us: float = 0.0
    network_gib_s: float | None = None  # between nodes (stage hops)

    def ps_per_weight(self, fmt: str, rows: int) -> float:
        """Picoseconds one weight of format ``fmt`` costs a matmul of ``rows`` rows: the
        measured curve interpolated (and extended along its last segment), else roofline."""
        curve = self.linear_ps.get(fmt) or (self.linear_ps.get("float32")
                                            if fmt != "int8" else None)
        if curve:
            rs = sorted(curve)
            if rows <= rs[0] or len(rs) == 1:
                return curve[rs[0]]
            k = min(bisect.bisect_left(rs, rows), len(rs) - 1)
            r0, r1 = rs[k - 1], rs[k]
            return curve[r0] + (curve[r1] - curve[r0]) * (rows - r0) / (r1 - r0)
        flops = self.tflops.get("bfloat16" if fmt == "int8" else fmt) or \
            self.tflops.get("float32")
        if not flops or not self.memory_gib_s:
            raise ValueError(f"no rate for {fmt} matmuls: the profile has neither a measured "
                             "curve nor FLOP/s and memory bandwidth")
        byte = 1 if fmt == "int8" else DTYPE_BYTES[fmt]
        return 1e12 * max(2 * rows / (flops * 1e12), byte / (self.memory_gib_s * 2**30))

    def coefficients(self, kv_dtype: str) -> dict[str, float]:
        """The engine-time coefficients in seconds: measured with a KV cache (and attention)
        in ``kv_dtype`` (16-bit caches share a calibration when only one was measured), or
        (vendor profiles) only the KV reads at memory bandwidth and attention at peak."""
        if self.overhead:
            other = "bfloat16" if kv_dtype == "float16" else "float16"
            got = self.overhead.get(kv_dtype) or self.overhead.get(other) or \
                self.overhead["float32"]
            return {k: float(got.get(k) or 0.0) / u for k, u in OVERHEAD_TERMS.items()}
        c = dict.fromkeys(OVERHEAD_TERMS, 0.0)
        c["linear_memory_factor"] = c["linear_compute_factor"] = 1.0
        if self.memory_gib_s:
            c["kv_byte_ps"] = 1 / (self.memory_gib_s * 2**30)
        peak = max(self.tflops.values(), default=0)
        if peak:
            c["attention_flop_ps"] = 1 / (peak * 1e12)
        return c

    def collective_s(self, nbytes: float, ranks: int) -> float:
        """One all-reduce (or gather) of ``nbytes`` over ``ranks`` devices of a node."""
        if ranks <= 1:
            return 0.0
        if self.all_reduce:
            bw = self.all_reduce.get("gib_s")
            return self.all_reduce["latency_us"] / 1e6 + (nbytes / (bw * 2**30) if bw else 0)
        if not self.link_gib_s:
            return self.link_latency_us / 1e6
        ring = 2 * (ranks - 1) / ranks  # a ring all-reduce moves this much per device
        return self.link_latency_us / 1e6 + ring * nbytes / (self.link_gib_s * 2**30)

    def hop_s(self, nbytes: float, across_nodes: bool) -> float:
        """Handing ``nbytes`` of hidden state to the next stage."""
        bw = self.network_gib_s if across_nodes else self.link_gib_s
        if bw:
            return self.link_latency_us / 1e6 + nbytes / (bw * 2**30)
        return self.collective_s(nbytes, 2)


def weight_format(dtype: str, quantization: str | None) -> str:
    return quantization or dtype


def linear_parts(spec: TransformerSpec, tp: int, fmt: str, stage: Stage | None,
                 shape: StepShape, rates: Rates) -> tuple[float, float]:
    """The stage's matmuls on one device, in seconds at the curve's rates, as ``(one row's
    time, the time more rows add)``: the first streams the weights (memory-bound), the second
    grows with the rows (compute-bound). Its layers run ``shape.rows`` rows, the last stage's
    LM head one row a sequence (only the last position is scored)."""
    blocks, head = stage_linear_params(spec, tp, stage)
    one = rates.ps_per_weight(fmt, 1)
    parts = [(blocks, shape.rows), (head, shape.seqs)]
    memory = sum(w * one for w, _ in parts)
    more = sum(w * (rates.ps_per_weight(fmt, r) - one) for w, r in parts)
    return memory * 1e-12, more * 1e-12


def linear_s(spec: TransformerSpec, tp: int, fmt: str, stage: Stage | None, shape: StepShape,
             rates: Rates, kv_dtype: str | None = None) -> float:
    """The stage's matmuls on one device: ``linear_parts`` scaled by the factors the
    calibration fitted to the engine's own steps (1 on vendor profiles)."""
    memory, more = linear_parts(spec, tp, fmt, stage, shape, rates)
    c = rates.coefficients(kv_dtype or fmt)
    return c["linear_memory_factor"] * memory + c["linear_compute_factor"] * more


def all_reduce_s(spec: TransformerSpec, tp: int, shape: StepShape, rates: Rates,
                 stage: Stage | None = None, act_bytes: int = 4) -> float:
    """The stage's collectives on one device: two all-reduces a layer (attention and MLP
    outputs), the embedding's on the first stage, the logits gathered on the last."""
    if tp == 1:
        return 0.0
    st = stage or Stage.whole(spec.num_layers)
    hidden = shape.rows * spec.hidden_size * act_bytes
    t = (st.num_attention + st.num_mlp + st.is_first) * rates.collective_s(hidden, tp)
    if st.is_last:
        t += rates.collective_s(shape.seqs * spec.vocab_size * 4, tp)
    return t


def time_features(spec: TransformerSpec, tp: int, fmt: str, kv_dtype: str, shape: StepShape,
                  rates: Rates, stage: Stage | None = None) -> list[float]:
    """The quantities the engine-time coefficients multiply, in ``OVERHEAD_TERMS`` order
    (the linear layers' two parts at the curve's rates first). The engine's own costs
    (step, sequences, sampling) count on the last stage, where the driver samples."""
    st = stage or Stage.whole(spec.num_layers)
    last = 1.0 if st.is_last else 0.0
    L = st.num_attention  # the layers whose cache this stage reads
    layers = (st.num_attention + st.num_mlp) / 2  # its blocks, in layers
    kv_heads, q_heads = local_kv_heads(spec.num_kv_heads, tp), spec.num_heads // tp
    kv_read = prefill_flops = 0.0
    if shape.kind == "decode":
        kv_read = L * shape.seqs * shape.length * 2 * kv_heads * spec.head_dim * \
            DTYPE_BYTES[kv_dtype]
    else:  # causal: QK^T and PV over half the square, 2 FLOPs a multiply-add
        prefill_flops = L * shape.seqs * q_heads * 2 * shape.length ** 2 * spec.head_dim
    return [*linear_parts(spec, tp, fmt, stage, shape, rates), last, last * shape.seqs,
            last * shape.seqs * spec.vocab_size, layers, layers * shape.rows * spec.hidden_size,
            kv_read, prefill_flops]


def stage_s(spec: TransformerSpec, tp: int, fmt: str, kv_dtype: str, shape: StepShape,
            rates: Rates, stage: Stage | None = None) -> float:
    """One step of ``shape`` on one stage (its slowest device: they run in lockstep)."""
    coef = rates.coefficients(kv_dtype)
    return sum(c * f for c, f in zip(coef.values(), time_features(
        spec, tp, fmt, kv_dtype, shape, rates, stage), strict=True)) + \
        all_reduce_s(spec, tp, shape, rates, stage)


@dataclass(frozen=True)
class Prediction:
    prefill_ms: float  # one prompt alone
    decode_ms: float  # one decode step of the batch (a micro-batch cycle with pp > 1)
    ttft_ms: float
    tpot_ms: float
    tokens_per_s: float  # all replicas

    def as_dict(self) -> dict:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


def step_s(spec: TransformerSpec, tp: int, stages: list[Stage], fmt: str, kv_dtype: str,
           shape: StepShape, rates: Rates, stage_nodes: list[int] | None = None) -> float:
    """One batch of ``shape`` through every stage, the hops between them included."""
    nodes = stage_nodes or [0] * len(stages)
    t = sum(stage_s(spec, tp, fmt, kv_dtype, shape, rates, st) for st in stages)
    hop = 2 * shape.rows * spec.hidden_size * 4  # hidden state and residual
    return t + sum(rates.hop_s(hop, nodes[i] != nodes[i + 1]) for i in range(len(stages) - 1))


def predict(spec: TransformerSpec, tp: int, stages: list[Stage], fmt: str, kv_dtype: str,
            rates: Rates, batch: int, prompt_len: int, output_len: int, replicas: int = 1,
            stage_nodes: list[int] | None = None) -> Prediction:
    """Serving ``batch`` concurrent requests a replica, each ``prompt_len`` tokens in and
    ``output_len`` out (see the module's docstring)."""
    prefill = step_s(spec, tp, stages, fmt, kv_dtype, StepShape("prefill", 1, prompt_len),
                     rates, stage_nodes)
    pp = len(stages)
    context = prompt_len + output_len // 2
    if pp == 1:
        decode = step_s(spec, tp, stages, fmt, kv_dtype, StepShape("decode", batch, context),
                        rates)
    else:  # micro-batches of batch / pp: one goes through every stage, or the slowest
        micro = StepShape("decode", math.ceil(batch / pp), context)  # stage sets the pace
        through = step_s(spec, tp, stages, fmt, kv_dtype, micro, rates, stage_nodes)
        slowest = max(stage_s(spec, tp, fmt, kv_dtype, micro, rates, st) for st in stages)
        decode = max(through, min(pp, batch) * slowest)
    tpot = decode + batch * prefill / max(1, output_len)
    return Prediction(prefill_ms=1e3 * prefill, decode_ms=1e3 * decode,
                      ttft_ms=1e3 * (prefill + (decode / 2 if batch > 1 else 0.0)),
                      tpot_ms=1e3 * tpot,
                      tokens_per_s=replicas * batch / tpot)
