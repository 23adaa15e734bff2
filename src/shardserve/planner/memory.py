"""Memory arithmetic: byte strings, and the bytes a model's shard needs on each device.

The counts mirror exactly what ``shardserve.layers`` allocates (a test checks the two agree):
column-parallel outputs and vocab rows split ``ceil(n / tp)`` ways, KV heads replicated when
tp exceeds their number, norms replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardserve.planner.partition import BlockWeights, Stage
from shardserve.planner.specs import (
    DTYPE_BYTES,
    QUANTIZATION_BYTES,
    EncoderSpec,
    TransformerSpec,
    WhisperSpec,
)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648; ``"500MB"`` -> 500000000; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. '2GiB', '512MiB' or '3GB'")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: 3.1 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def shard(n: int, tp: int) -> int:
    """Rows one rank holds when ``n`` rows split ``tp`` ways (the last rank may hold padding)."""
    return -(-n // tp)


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """KV heads per rank: split when there are enough, else each rank keeps one replica."""
    return max(1, num_kv_heads // tp)


def _widths(spec: TransformerSpec, tp: int) -> tuple[int, int, int, int]:
    """One rank's share of a decoder layer: query features, key (= value) features,
    intermediate features, and vocabulary rows."""
    return (spec.num_heads // tp * spec.head_dim,
            local_kv_heads(spec.num_kv_heads, tp) * spec.head_dim,
            shard(spec.intermediate_size, tp), shard(spec.vocab_size, tp))


def _stage(spec: TransformerSpec, stage: Stage | None) -> Stage:
    return stage or Stage.whole(spec.num_layers)


def _mlp_mats(spec: TransformerSpec) -> int:
    """Matrices of a layer's MLP: gate, up and down; up and down without a gate."""
    return 3 if spec.gated_mlp else 2


def decode_kv_tokens(max_num_seqs: int, pp: int, max_len: int) -> int:
    """KV positions a micro-batch's decode step reads, as the balanced pipeline split weighs
    them: its share of the sequences at half the context (a sequence's mean length over a
    life that reaches it)."""
    return -(-max_num_seqs // pp) * max_len // 2


def block_weights(spec: TransformerSpec | EncoderSpec, kv_tokens: int = 0) -> BlockWeights:
    """What a pipeline split weighs a decoder's blocks and LM head as (``partition.py``): the
    elements a decode step reads, parameters and, in an attention block, ``kv_tokens``
    positions of keys and values (a micro-batch's sequences times a typical length)."""
    if not isinstance(spec, TransformerSpec):
        return BlockWeights()
    h = spec.hidden_size
    q, kv, i, vocab = _widths(spec, 1)
    return BlockWeights(attention=(q + 2 * kv) * h + h * q + 2 * kv * kv_tokens,
                        mlp=_mlp_mats(spec) * i * h, head=vocab * h)


def weight_params_per_device(spec: TransformerSpec | EncoderSpec, tp: int,
                             stage: Stage | None = None) -> int:
    """Parameter count one tensor-parallel rank (of pipeline ``stage``, default the whole
    model) holds: its decoder layers, the embedding on the first stage, the final norm and LM
    head on the last (a tied head shares the embedding only when one stage holds both)."""
    if isinstance(spec, EncoderSpec):
        return _encoder_params_per_device(spec, tp)
    if isinstance(spec, WhisperSpec):
        return sum(_whisper_params(spec, tp))
    st = _stage(spec, stage)
    h = spec.hidden_size
    q, kv, i, vocab_rows = _widths(spec, tp)
    attn = (q + 2 * kv) * h + h * q + (q + 2 * kv if spec.qkv_bias else 0)
    mlp = _mlp_mats(spec) * i * h
    vocab = vocab_rows * h
    embed = vocab if st.is_first else 0
    head = vocab + h if st.is_last else 0
    if st.is_first and st.is_last and spec.tie_word_embeddings:
        head -= vocab
    # each block has its norm (h)
    return st.num_attention * (attn + h) + st.num_mlp * (mlp + h) + embed + head


def _whisper_params(spec: WhisperSpec, tp: int) -> tuple[int, int]:
    """``(matrices, vectors)`` one rank of a Whisper holds: attention projections and MLPs
    split (their column biases too), convolutions, positions, LayerNorms and the row
    projections' biases whole; the vocabulary split; the head tied to it."""
    d, q = spec.hidden_size, spec.hidden_size // tp

    def attention() -> tuple[int, int]:  # q, k, v, out; k without a bias
        return 4 * q * d, 2 * q + d

    def layer(ffn: int, attentions: int, norms: int) -> tuple[int, int]:
        f = shard(ffn, tp)
        m, v = attention()
        return attentions * m + 2 * f * d, attentions * v + f + d + 2 * d * norms

    enc_m, enc_v = layer(spec.encoder_ffn, 1, 2)
    dec_m, dec_v = layer(spec.intermediate_size, 2, 3)
    convs = d * spec.num_mel_bins * 3 + d * d * 3
    tables = (spec.max_source_positions + spec.max_position) * d + shard(spec.vocab_size, tp) * d
    matrices = spec.encoder_layers * enc_m + spec.num_layers * dec_m + convs + tables
    vectors = spec.encoder_layers * enc_v + spec.num_layers * dec_v + 2 * d + 2 * 2 * d
    return matrices, vectors


def _encoder_params_per_device(spec: EncoderSpec, tp: int) -> int:
    """BERT: QKV and the MLP's first layer split by output (with their biases), the
    projections back split by input (biases whole), LayerNorms and the small position /
    token-type tables replicated, the vocabulary split."""
    h, i = spec.hidden_size, shard(spec.intermediate_size, tp)
    q = h // tp
    attn = 3 * q * h + 3 * q + q * h + h + 2 * h
    mlp = i * h + i + h * i + h + 2 * h
    emb = shard(spec.vocab_size, tp) * h + (spec.max_position + spec.type_vocab_size) * h + 2 * h
    # a classifier keeps HF's pooler (h x h) and its label layer, replicated
    head = (h * h + h + h * spec.num_labels + spec.num_labels) if spec.num_labels else 0
    return spec.num_layers * (attn + mlp) + emb + head


def vector_params_per_device(spec: TransformerSpec | EncoderSpec, tp: int,
                             stage: Stage | None = None) -> int:
    """Of those, the ones in vectors (norms, biases): held in the compute dtype when it
    differs from the weights' (``runtime/precision.py``)."""
    if isinstance(spec, EncoderSpec):
        return 0  # encoders hold everything in one dtype
    if isinstance(spec, WhisperSpec):
        return _whisper_params(spec, tp)[1]
    st = _stage(spec, stage)
    q, kv, _, _ = _widths(spec, tp)
    bias = q + 2 * kv if spec.qkv_bias else 0
    return st.num_attention * (spec.hidden_size + bias) + st.num_mlp * spec.hidden_size + \
        (spec.hidden_size if st.is_last else 0)


def linear_params_per_device(spec: TransformerSpec, tp: int) -> tuple[int, int, int]:
    """``(a layer's attention block, its MLP block, the LM head)``: the matrix weights one
    rank multiplies by, the matmul work of a step (``planner/cost.py``) and what quantization
    converts."""
    h = spec.hidden_size
    q, kv, i, vocab = _widths(spec, tp)
    return (q + 2 * kv) * h + h * q, _mlp_mats(spec) * i * h, vocab * h


def stage_linear_params(spec: TransformerSpec, tp: int, stage: Stage | None = None
                        ) -> tuple[int, int]:
    """``(its decoder blocks, its LM head)``: the matrix weights one rank of ``stage``
    multiplies by (the head is 0 but on the last stage)."""
    st = _stage(spec, stage)
    attn, mlp, head = linear_params_per_device(spec, tp)
    return st.num_attention * attn + st.num_mlp * mlp, head if st.is_last else 0


def quantized_params_per_device(spec: TransformerSpec, tp: int, stage: Stage | None = None
                                ) -> tuple[int, int]:
    """``(weights, output features)`` of the layers weight-only quantization converts on one
    rank: every linear layer and the LM head (the embedding too when tied to it)."""
    st = _stage(spec, stage)
    h = spec.hidden_size
    q, kv, i, vocab = _widths(spec, tp)
    m = _mlp_mats(spec)
    blocks, head = stage_linear_params(spec, tp, st)
    outputs = st.num_attention * ((q + 2 * kv) + h) + st.num_mlp * ((m - 1) * i + h) + \
        (vocab if st.is_last else 0)
    return blocks + head, outputs


def weight_bytes_per_device(spec: TransformerSpec | EncoderSpec, tp: int, dtype: str,
                            vector_dtype: str | None = None,
                            quantization: str | None = None,
                            stage: Stage | None = None) -> int:
    """Bytes of weights one rank (of ``stage``) holds: matrices in ``dtype``, vectors (norms,
    biases) in ``vector_dtype`` (default the same); with ``quantization`` the linear layers
    and LM head in its bytes per weight plus a float32 scale per output feature."""
    vectors = vector_params_per_device(spec, tp, stage)
    total = ((weight_params_per_device(spec, tp, stage) - vectors) * DTYPE_BYTES[dtype]
             + vectors * DTYPE_BYTES[vector_dtype or dtype])
    if quantization is None or isinstance(spec, EncoderSpec):
        return total
    weights, outputs = quantized_params_per_device(spec, tp, stage)
    return (total - weights * DTYPE_BYTES[dtype]
            + weights * QUANTIZATION_BYTES[quantization] + outputs * 4)


def kv_bytes_per_token(spec: TransformerSpec, tp: int, dtype: str,
                       stage: Stage | None = None) -> int:
    """KV-cache bytes one token costs on one rank, over the layers of ``stage`` (all)."""
    kv = local_kv_heads(spec.num_kv_heads, tp) * spec.head_dim
    return 2 * _stage(spec, stage).num_attention * kv * DTYPE_BYTES[dtype]


def encoder_activation_bytes(spec: WhisperSpec, tp: int, dtype: str) -> int:
    """A reserve for encoding one window of audio on one rank: the features, the first
    convolution's output, a layer's widest live tensors over the encoder's states and one
    head's attention scores (the runner encodes one window at a time)."""
    d, t = spec.hidden_size, spec.max_source_positions
    per_state = 6 * d + 3 * d // tp + shard(spec.encoder_ffn, tp)
    return (spec.num_mel_bins * 2 * t + 2 * t * d + t * per_state + t * t) * DTYPE_BYTES[dtype]


def cross_bytes_per_seq(spec: TransformerSpec, tp: int, dtype: str) -> int:
    """An encoder-decoder's cross-attention cache for one sequence on one rank: every decoder
    layer's keys and values of the encoder's states (0 for a decoder-only model)."""
    if not isinstance(spec, WhisperSpec):
        return 0
    blocks, rows = spec.cross_blocks
    return 2 * spec.num_layers * blocks * rows * (spec.num_heads // tp) * spec.head_dim * \
        DTYPE_BYTES[dtype]


def check_stages_fit(spec: TransformerSpec, tp: int, stages: list[Stage], dtype: str,
                     budget: int, vector_dtype: str | None = None,
                     quantization: str | None = None) -> list[int]:
    """Weight bytes per device of each stage; ``ValueError`` naming the first stage whose
    weights exceed ``budget``, with its bytes and the budget."""
    needs = [weight_bytes_per_device(spec, tp, dtype, vector_dtype, quantization, st)
             for st in stages]
    for st, need in zip(stages, needs, strict=True):
        if need > budget:
            raise ValueError(
                f"pipeline {st.name} needs {format_bytes(need)} ({need} bytes) of "
                f"{quantization or dtype} weights per device at tp={tp}; the device budget "
                f"is {format_bytes(budget)} ({budget} bytes); move layers off it (an "
                "explicit pipeline split), raise tp or pp, or raise --device-memory")
    return needs


def check_fits(spec: TransformerSpec, tp: int, dtype: str, budget: int, max_tp: int,
               vector_dtype: str | None = None, quantization: str | None = None) -> int:
    """Weight bytes per device at ``tp``; ``ValueError`` naming the need and a fix if too big."""
    def need_at(t: int) -> int:
        return weight_bytes_per_device(spec, t, dtype, vector_dtype, quantization)

    need = need_at(tp)
    if need <= budget:
        return need
    fits = [t for t in range(tp + 1, spec.num_heads + 1)
            if spec.tp_ok(t) and need_at(t) <= budget]
    hint = "no tensor-parallel size makes it fit; raise --device-memory"
    if fits:
        per = format_bytes(need_at(fits[0]))
        hint = f"use tp>={fits[0]} (needs {per} per device) or raise --device-memory"
    if fits and fits[0] > max_tp:
        hint += f"; tp={fits[0]} needs {fits[0]} devices (you have {max_tp})"
    raise ValueError(
        f"model needs {format_bytes(need)} ({need} bytes) of {quantization or dtype} weights "
        f"per device at "
        f"tp={tp}; the device budget is {format_bytes(budget)} ({budget} bytes); {hint}")


REPLAY_CAP = 64 << 20


def replay_bytes(spec: TransformerSpec, tp: int, max_seqs: int) -> int:
    """The arena recorded decode steps (``runtime/replay.py``) share on one rank: the
    activations alive at once in a step of ``max_seqs`` sequences, counted as two layers'
    float32 outputs (two norms' outputs and sums, QKV, attention, output projection,
    gate/up, activation, down), the logits and the step's inputs (a block table at 16 tokens
    a block); at most ``REPLAY_CAP``. 0 at tp > 1 and for Whisper, whose steps are not
    recorded."""
    if tp != 1 or isinstance(spec, WhisperSpec):
        return 0
    h = spec.hidden_size
    q, kv, i, v = _widths(spec, tp)
    head = -(-v // 64) * 64  # the packed head's panels
    inputs = 4 * h + 3 * 8 + (spec.max_position // 16 + 1) * 8  # block table at 16 a block
    per_row = (2 * (6 * h + 2 * q + 2 * kv + 3 * i) + 2 * h + head) * 4 + inputs
    return min(REPLAY_CAP, max_seqs * per_row)


def activation_bytes(spec: TransformerSpec, tp: int, dtype: str, max_tokens: int,
                     max_seqs: int) -> int:
    """A reserve for one step's activations on one rank: the widest live tensors of a layer
    for ``max_tokens`` tokens (residual, hidden, QKV, gate/up, float32 norm copies) plus
    float32 logits for ``max_seqs`` sampled rows."""
    b = DTYPE_BYTES[dtype]
    h = spec.hidden_size
    q, kv, i, _ = _widths(spec, tp)
    qkv = q + 2 * kv
    per_token = (4 * h + qkv + _mlp_mats(spec) * i) * b + 2 * h * 4
    return max_tokens * per_token + 2 * max_seqs * spec.vocab_size * 4


@dataclass(frozen=True)
class StageBytes:
    """What each device of one pipeline stage holds: weights, the activation reserve of one
    step, and the KV cache at ``kv_per_token`` bytes a token (the stage's layers only)."""

    stage: Stage
    weights: int
    activations: int
    kv_per_token: int

    def kv_tokens(self, budget: int) -> int:
        """Tokens of KV cache that fit in ``budget`` beside the weights and activations (a
        stage of MLP blocks only holds none: any number, once those fit)."""
        free = max(0, budget - self.weights - self.activations)
        if not self.kv_per_token:
            return 2**62 if free else 0
        return free // self.kv_per_token

    def kv_blocks(self, budget: int, block_size: int) -> int:
        return self.kv_tokens(budget) // block_size

    def total(self, kv_tokens: int) -> int:
        return self.weights + self.activations + kv_tokens * self.kv_per_token


def stage_bytes(spec: TransformerSpec, tp: int, stages: list[Stage], weight_dtype: str,
                compute_dtype: str, kv_dtype: str, quantization: str | None,
                max_tokens: int, max_seqs: int) -> list[StageBytes]:
    """Every stage's bytes per device, the one memory policy of a decoder deployment: the
    engine sizes its KV cache from it, the host places with it, ``shardserve plan`` shows
    it. Weights count in their dtype (vectors in the compute dtype), activations in the
    compute dtype, the cache in its own."""
    act = activation_bytes(spec, tp, compute_dtype, max_tokens, max_seqs) + \
        replay_bytes(spec, tp, max_seqs)
    if isinstance(spec, WhisperSpec):  # the cross-attention cache and one window's encoding
        act += max_seqs * cross_bytes_per_seq(spec, tp, kv_dtype) + \
            encoder_activation_bytes(spec, tp, compute_dtype)
    return [StageBytes(st, weight_bytes_per_device(spec, tp, weight_dtype, compute_dtype,
                                                   quantization, st),
                       act, kv_bytes_per_token(spec, tp, kv_dtype, st)) for st in stages]
