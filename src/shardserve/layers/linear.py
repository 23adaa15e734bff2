"""Tensor-parallel linear layers (Megatron-style).

Column-parallel splits the output features: rank r holds rows ``[r*n/tp, (r+1)*n/tp)`` of the
weight and produces its slice of the output, with no communication. Row-parallel splits the
input features: each rank multiplies its slice of the input by its columns of the weight and an
all-reduce sums the partial outputs. A column layer feeding a row layer (QKV -> O, gate/up ->
down) therefore needs one all-reduce per pair.

Every parameter has ``weight_loader(param, src, shard_id=None)`` where ``src`` is a lazy
checkpoint tensor (``models.loader.LazyTensor``) read with ``src.read(dim, start, stop)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardserve.kernels import ops
from shardserve.planner.memory import local_kv_heads
from shardserve.runtime.group import Group


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias``. ``weight`` is ``W`` ``(out, in)``, or its panels (``(out / NR, in,
    NR)``, or K pairs ``(out / 64, in / 2, 64, 2)`` for bfloat16 dot products) when
    ``pack_in_place`` repacked it at load time: those run the native packed GEMM at every row
    count. int8 panels stand for ``W = panels * scale[:, None]``. An unpacked weight with a
    few rows (decode at small batch) takes the native kernel that streams it from every core;
    the rest takes PyTorch's GEMM."""
    if weight.dim() >= 3:
        y = ops.packed_linear(x, weight, bias, scale)
        if y is not None:
            return y
        weight = ops.unpack_weight(weight)
        if scale is not None:  # no kernel took it: correct, not fast
            weight = ops.dequantize_int8(weight, scale, x.dtype)
    else:
        y = ops.small_linear(x, weight, bias)
        if y is not None:
            return y
    if weight.dtype != x.dtype:  # a 16-bit weight no kernel took: correct, not fast
        weight = weight.to(x.dtype)
    return F.linear(x, weight, bias)


QUANTIZATIONS = ("int8",)


def pack_in_place(param: nn.Parameter, quantization: str | None = None,
                  pad: bool = False) -> torch.Tensor | None:
    """Repack a loaded ``(out, in)`` weight for the native GEMM, in place, where it applies
    (``kernels.ops.pack_weight``; ``pad``: up to whole panels with zero rows, whose outputs
    the caller drops); otherwise leave it as it is. With ``quantization="int8"`` the panels
    hold int8 and the per-output-feature scales are returned (None where the weight could
    not be packed: it stays as it is, unquantized)."""
    if quantization == "int8":
        q, scale = ops.quantize_int8(param.data)
        packed = ops.pack_weight(q, pad=pad)
        if packed is None:
            return None
        param.data = packed
        padding = packed.shape[0] * packed.shape[2] - len(scale)  # rows of zeros, scale 1
        return torch.cat([scale, scale.new_ones(padding)]) if padding else scale
    packed = ops.pack_weight(param.data, pad=pad)
    if packed is not None:
        param.data = packed
    return None


class _Quantizable(nn.Module):
    """A layer whose ``weight`` may be held as int8 panels with ``weight_scale`` (O,): set
    ``quantization`` before loading (``ModelRunner``); ``process_weights_after_loading`` packs
    and quantizes."""

    quantization: str | None = None
    weight: nn.Parameter
    weight_scale: torch.Tensor | None = None

    def process_weights_after_loading(self) -> None:
        self.weight_scale = pack_in_place(self.weight, self.quantization)


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size={tp}")
    return n // tp


class ColumnParallelLinear(_Quantizable):
    """``y[..., shard] = x @ W[shard].T``: the output stays split across ranks."""

    def __init__(self, in_features: int, out_features: int, group: Group,
                 bias: bool = False) -> None:
        super().__init__()
        self.group = group
        self.out_local = _divide(out_features, group.size, "output features")
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_local), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src, shard_id=None) -> None:
        start = self.group.rank * self.out_local
        param.data.copy_(src.read(0, start, start + self.out_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.weight_scale)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up projections). Shard ``i`` of
    the checkpoint fills this rank's slice of output block ``i``."""

    def __init__(self, in_features: int, out_sizes: list[int], group: Group,
                 bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), group, bias)
        self.local_sizes = [_divide(n, group.size, "output features") for n in out_sizes]

    def weight_loader(self, param: nn.Parameter, src, shard_id=None) -> None:
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        start = self.group.rank * size
        param.data[offset:offset + size].copy_(src.read(0, start, start + size))


class GateUpParallelLinear(MergedColumnParallelLinear):
    """A gated MLP's gate and up projections in one matmul, and its activation: ``act(x)`` is
    ``silu(gate) * up``. Where the weight is packed in K pairs (16-bit or int8 weights on
    AMX, ``ops.packs_in_pairs``) its gate and up rows are interleaved before packing and the
    GEMM forms the activation as it stores its sums (``bf16_gemm.c``): the two projections'
    outputs are never written out. Elsewhere the elementwise kernel follows the matmul."""

    def __init__(self, in_features: int, intermediate: int, group: Group,
                 bias: bool = False) -> None:
        super().__init__(in_features, [intermediate, intermediate], group, bias)
        self.interleaved = False

    def process_weights_after_loading(self) -> None:
        I, K = self.local_sizes[0], self.weight.shape[1]
        dtype = torch.int8 if self.quantization == "int8" else self.weight.dtype
        self.interleaved = I % ops.GATE_UP_BLOCK == 0 and ops.packs_in_pairs(dtype, K) \
            and self.weight.device.type == "cpu"
        if self.interleaved:
            self.weight.data = ops.interleave_gate_up(self.weight.data)
            if self.bias is not None:
                self.bias.data = ops.interleave_gate_up(self.bias.data)
        super().process_weights_after_loading()
        if self.interleaved and self.weight.dim() != 4:  # not packed after all: as it was
            self.interleaved = False
            self.weight.data = ops.deinterleave_gate_up(self.weight.data, 0).contiguous()
            if self.bias is not None:
                self.bias.data = ops.deinterleave_gate_up(self.bias.data, 0)
            if self.weight_scale is not None:
                self.weight_scale = ops.deinterleave_gate_up(self.weight_scale, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate then up, ``(..., 2 I)``."""
        y = linear(x, self.weight, self.bias, self.weight_scale)
        return ops.deinterleave_gate_up(y) if self.interleaved else y

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(x W_gate^T) * (x W_up^T)``, ``(..., I)``."""
        if self.interleaved:
            y = ops.packed_linear(x, self.weight, self.bias, self.weight_scale, silu_mul=True)
            if y is not None:
                return y
        gate_up = self.forward(x)
        act = ops.silu_mul(gate_up)
        if act is None:
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        return act


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul, split by heads. With grouped-query
    attention and tp > KV heads, each KV head is replicated on ``tp / num_kv_heads`` ranks,
    the ones whose query heads attend to it."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 group: Group, bias: bool = False) -> None:
        tp = group.size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp, "attention heads")
        self.num_kv_heads = local_kv_heads(num_kv_heads, tp)
        if (tp > num_kv_heads and tp % num_kv_heads) or (tp <= num_kv_heads and num_kv_heads % tp):
            raise ValueError(f"{num_kv_heads} KV heads cannot be split or replicated evenly "
                             f"over tensor_parallel_size={tp}")
        # First KV head of this rank: split when there are enough, else the replica it needs.
        r = group.rank
        self.kv_start = r * self.num_kv_heads if tp <= num_kv_heads else r // (tp // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden, out, group, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, src, shard_id=None) -> None:
        hd = self.head_dim
        if shard_id == "q":
            dst, start = 0, self.group.rank * self.q_size
            size = self.q_size
        else:
            dst = self.q_size + (self.kv_size if shard_id == "v" else 0)
            start, size = self.kv_start * hd, self.kv_size
        param.data[dst:dst + size].copy_(src.read(0, start, start + size))


class RowParallelLinear(_Quantizable):
    """``y = all_reduce(x[..., shard] @ W[:, shard].T) + b``: input split, output whole."""

    def __init__(self, in_features: int, out_features: int, group: Group,
                 bias: bool = False) -> None:
        super().__init__()
        self.group = group
        self.in_local = _divide(in_features, group.size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:  # whole on every rank, added once after the reduction
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, src, shard_id=None) -> None:
        start = self.group.rank * self.in_local
        param.data.copy_(src.read(1, start, start + self.in_local))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(linear(x, self.weight, scale=self.weight_scale))
        return y if self.bias is None else y + self.bias
