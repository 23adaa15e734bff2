"""The native kernels as tensor functions. Each returns ``None`` when it does not apply (no
compiler here, a dtype or shape it does not take) and the caller runs its PyTorch path."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading

import torch

from shardserve import kernels

log = logging.getLogger(__name__)
_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
SMALL_GEMM_MAX_ROWS = 8  # MAX_ROWS in small_gemm.c
FEW_I8_ROWS = 16  # bf16_gemm.c: int8 calls of this many rows on AMX keep x in float32


@functools.cache
def _fn(lib: str, name: str, argtypes: tuple) -> _Native | None:
    handle = kernels.load(lib)
    if handle is None:
        return None
    fn = getattr(handle, name)
    fn.restype, fn.argtypes = ctypes.c_int, list(argtypes)
    return _Native(fn)


class _Native:
    """A kernel's ctypes function. While ``recording`` is open in the calling thread each
    call is also kept, as ``(function, arguments)``, for ``runtime/replay.py`` to run again."""

    __slots__ = ("fn",)

    def __init__(self, fn: ctypes._CFuncPtr) -> None:
        self.fn = fn

    def __call__(self, *args):
        calls = getattr(_recorded, "calls", None)
        if calls is not None:
            calls.append((self.fn, args))
        return self.fn(*args)


_recorded = threading.local()


@contextlib.contextmanager
def recording():
    """The native calls this thread makes inside the block, in order."""
    outer = getattr(_recorded, "calls", None)
    _recorded.calls = []
    try:
        yield _recorded.calls
    finally:
        _recorded.calls = outer


def _attention_fn():
    return _fn("paged_attention", "paged_decode_attention",
               (_P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32, _I32, _I64,
                ctypes.c_float, _I32, _I32, _I64))


def _prefill_attention_fn():
    return _fn("prefill_attention", "prefill_attention",
               (_P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32, _I64, _I64, _I64, _I64, _I64,
                _I64, ctypes.c_float, _I32))


def _gemm_fn():
    return _fn("small_gemm", "small_gemm", (_P, _P, _P, _P, _I32, _I64, _I64, _I32, _I32))


def _packed_fn():
    return _fn("gemm", "packed_gemm", (_P, _P, _P, _P, _P, _I64, _I64, _I64, _I32, _I32))


# Weight types the linear kernels take (vecmath.h): 16-bit and int8 weights are read into
# float32 registers, so activations, accumulation and results stay float32. int8 only packed,
# with a scale per output feature.
_WTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}


def _weight_cpu(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.dtype in _WTYPES and w.is_contiguous()


@functools.cache
def packed_width() -> int | None:
    """Output features per panel of the packed layout (64 with AVX-512, 16 with AVX2), or None
    without the kernel."""
    handle = kernels.load("gemm")
    return None if handle is None else int(handle.packed_gemm_nr())


def _pairs_fn():
    return _fn("bf16_gemm", "bf16_gemm",
               (_P, _P, _P, _P, _P, _I64, _I64, _I64, _I32, _I32, _I32, _I32))


# bf16_gemm.c's modes: the CPU's own bfloat16 dot products.
PAIR_MODES = {1: "AVX512-BF16", 2: "AMX"}
# vdpbf16ps takes bfloat16 and int8 layers only where it completes at least this many times
# float32 FMA's products a cycle (``dp_rate``); at ~1 reading the weights into float32
# registers (gemm.c) is as fast and keeps the activations exact.
DP_RATE_MIN = 1.5


@functools.cache
def cpu_pair_mode() -> int:
    """The bfloat16 dot products this CPU and build have: 2 AMX tiles, 1 AVX512-BF16's
    vdpbf16ps only, 0 none."""
    handle = kernels.load("bf16_gemm")
    return 0 if handle is None else int(handle.bf16_gemm_mode())


@functools.cache
def dp_rate() -> float:
    """vdpbf16ps's products a cycle over vfmadd231ps's on this core, measured once (a few
    hundred microseconds in ``bf16_gemm.c``): ~1 on Sapphire Rapids, ~2 on AMD Zen 4 and 5;
    0 without AVX512-BF16."""
    if cpu_pair_mode() < 1:
        return 0.0
    fn = kernels.load("bf16_gemm").bf16_dp_rate
    fn.restype, fn.argtypes = ctypes.c_double, []
    return float(fn())


@functools.cache
def pair_mode() -> int:
    """The kernel this process runs bfloat16 and int8 weights on, packed in K pairs
    (``bf16_gemm.c``): 2 AMX tiles where the CPU has them; 1 AVX512-BF16's vdpbf16ps where it
    multiplies at least ``DP_RATE_MIN`` times as fast as float32 FMAs (AMD Zen 4 and 5: twice;
    on a Sapphire Rapids core without AMX it would be no faster, one instruction of 32
    products a cycle against two of 16, benchmarks/kernels.py --bf16); else 0, and those
    weights are read into float32 registers by ``gemm.c``. ``SHARDSERVE_BF16_GEMM=off``
    makes it 0, ``=on`` takes vdpbf16ps whatever its rate."""
    setting = os.environ.get("SHARDSERVE_BF16_GEMM", "").lower()
    if setting in ("off", "0"):
        return 0
    mode = cpu_pair_mode()
    if mode == 1 and setting not in ("on", "1"):
        fast = dp_rate() >= DP_RATE_MIN
        log.info("vdpbf16ps measured at %.2fx float32 FMA's products a cycle: bfloat16 and "
                 "int8 layers run %s", dp_rate(), "on it" if fast else "in float32 registers")
        return mode if fast else 0
    return mode


def pair_mode_env() -> dict[str, str]:
    """The environment that makes a worker process on this machine run what ``pair_mode``
    chose here, without measuring again: every rank of a deployment, and the path it reports,
    then agree (empty where there is nothing to decide: AMX, or no vdpbf16ps)."""
    if cpu_pair_mode() != 1:
        return {}
    return {"SHARDSERVE_BF16_GEMM": "on" if pair_mode() == 1 else "off"}


def linear_path(dtype: str, quantization: str | None = None) -> str:
    """The kernel the packed linear layers run for weights of ``dtype`` ("bfloat16", ...; or
    int8 ``quantization``), in words."""
    if packed_width() is None:
        return "PyTorch GEMM"
    weights = quantization or dtype
    odd = "a layer whose input width is not a multiple of 32 in float32 registers"
    if weights in ("int8", "bfloat16") and pair_mode() == 2:
        few = (f"; calls of {FEW_I8_ROWS} rows or fewer on float32 registers, activations "
               "float32" if weights == "int8" else "")
        return ("AMX bfloat16 dot products, float32 sums (activations rounded to bfloat16; "
                f"{odd}{few})")
    if weights in ("int8", "bfloat16") and pair_mode() == 1:
        # the rate itself is logged once (pair_mode): it moves by a few percent between
        # processes, and this text is a metric label and a plan field
        return (f"AVX512-BF16 vdpbf16ps bfloat16 dot products (measured at >= {DP_RATE_MIN}x "
                f"float32 FMA's rate), float32 sums (activations rounded to bfloat16; {odd})")
    isa = "AVX-512" if packed_width() == 64 else "AVX2"
    if weights == "float32":
        return f"{isa} float32 FMA"
    return f"{isa} float32 FMA, {weights} weights widened in registers"


def _sample_fn():
    return _fn("sampling", "sample_rows", (_P, _P, _P, _I64, _I64, _I32))


def _elementwise_fn(name: str):
    argtypes = {"add_rms_norm": (_P, _P, _P, _P, _P, _I64, _I64, ctypes.c_float, _I32),
                "silu_mul": (_P, _P, _I64, _I64, _I32),
                "rotary": (_P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I64, _I64, _I32),
                "write_kv": (_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I32, _I32)}
    return _fn("elementwise", name, argtypes[name])


def available() -> bool:
    return None not in (_attention_fn(), _gemm_fn(), _packed_fn(),
                        _elementwise_fn("add_rms_norm"))


def _f32_cpu(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in ts)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           tables: torch.Tensor, context: torch.Tensor, num_kv_heads: int,
                           window: int | None, scale: float) -> torch.Tensor | None:
    """q (D, nh, hd) against the cache blocks in ``tables`` (D, nb) up to ``context`` (D,);
    float32 q (each token's heads contiguous, tokens at any stride: the QKV output's view),
    the caches float32, bfloat16 or float16 (both the same)."""
    fn = _attention_fn()
    if q.dim() != 3 or q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    if (fn is None or q.device.type != "cpu" or q.dtype != torch.float32
            or not _weight_cpu(k_cache) or not _weight_cpu(v_cache)
            or k_cache.dtype != v_cache.dtype or k_cache.dtype == torch.int8
            or tables.dtype != torch.int64 or context.dtype != torch.int64):
        return None
    tables, context = tables.contiguous(), context.contiguous()
    D, nh, hd = q.shape
    out = q.new_empty(D, nh, hd)
    rc = fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            context.data_ptr(), out.data_ptr(), D, tables.shape[1], nh, num_kv_heads, hd,
            k_cache.shape[1], window or 0, scale, torch.get_num_threads(),
            _WTYPES[k_cache.dtype], q.stride(0))
    return out if rc == 0 else None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                      scale: float) -> torch.Tensor | None:
    """Causal attention of a prefill chunk: q (n, nh, hd), the last n positions of a context
    whose keys and values are k, v (ctx, nkv, hd), all float32 on the CPU with each head's
    features contiguous (tokens and heads at any stride: the QKV output's views) ->
    (n, nh, hd). None where the kernel does not apply (no kernel, a context over its cap, a
    head size it does not take)."""
    fn = _prefill_attention_fn()
    if fn is None or q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        return None
    n, nh, hd = q.shape
    ctx, nkv = k.shape[0], k.shape[1]
    if (q.stride(1) != hd or any(t.stride(2) != 1 for t in (q, k, v))
            or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (q, k, v))
            or k.shape[2] != hd or ctx < n):
        return None
    out = q.new_empty(n, nh, hd)
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n, ctx, nh, nkv, hd,
            q.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1), window or 0,
            scale, torch.get_num_threads())
    return out if rc == 0 else None


def small_linear(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` for 1..8 rows of float32 ``x``, weight ``(O, K)`` in float32,
    bfloat16 or float16, every thread streaming its own slice of the weights."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= SMALL_GEMM_MAX_ROWS or torch.is_grad_enabled():
        return None
    fn = _gemm_fn()
    x = x.contiguous()
    if (fn is None or not _f32_cpu(x) or not _weight_cpu(weight) or weight.dtype == torch.int8
            or (bias is not None and not _f32_cpu(bias))):
        return None
    N, K = x.shape
    O = weight.shape[0]
    y = x.new_empty(N, O)
    rc = fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
            y.data_ptr(), N, K, O, torch.get_num_threads(), _WTYPES[weight.dtype])
    return y if rc == 0 else None


def pack_weight(weight: torch.Tensor, pad: bool = False) -> torch.Tensor | None:
    """A linear weight ``(O, K)`` as the packed kernel's panels in its own dtype, or None where
    it does not apply: no kernel, not on the CPU, O not a multiple of the panel width (with
    ``pad``, zero rows make it one: the caller drops the extra outputs).

    - bfloat16 and int8 weights where ``pair_mode`` runs them, K a multiple of 32: panels
      of K pairs ``(O / 64, K / 2, 64, 2)`` for ``bf16_gemm.c``.
    - otherwise ``(O / NR, K, NR)`` for ``gemm.c``, which at 16-64 rows beats PyTorch's
      float32 GEMM (MKL) by 1.5-2x on AVX2 and at one row streams weights within 10% of the
      unpacked small-batch kernel (benchmarks/kernels.py)."""
    nr = packed_width()
    if nr is None or weight.dim() != 2 or not _weight_cpu(weight):
        return None
    pairs = packs_in_pairs(weight.dtype, weight.shape[1])
    if pairs:
        nr = PAIR_WIDTH
    if weight.shape[0] % nr and not pad:
        return None
    if weight.shape[0] % nr:
        weight = torch.cat([weight, weight.new_zeros(-weight.shape[0] % nr, weight.shape[1])])
    O, K = weight.shape
    if pairs:
        return weight.view(O // nr, nr, K // 2, 2).transpose(1, 2).contiguous()
    return weight.view(O // nr, nr, K).transpose(1, 2).contiguous()


PAIR_WIDTH = 64  # NR in bf16_gemm.c


def packs_in_pairs(dtype: torch.dtype, K: int) -> bool:
    """Whether ``pack_weight`` lays a CPU weight of ``dtype`` with ``K`` inputs out in K pairs
    for ``bf16_gemm.c``."""
    return dtype in (torch.bfloat16, torch.int8) and K % 32 == 0 and pair_mode() > 0


def packed_features(packed: torch.Tensor) -> int:
    """Output features (padding included) of ``pack_weight``'s panels."""
    return packed.shape[0] * packed.shape[2]


def packed_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``W[rows]`` ``(len(rows), K)`` of the weight ``pack_weight`` packed (an embedding
    tied to a packed head reads its rows from the panels)."""
    nr = packed.shape[2]
    y = packed[rows // nr, :, rows % nr]
    return y.flatten(-2) if packed.dim() == 4 else y


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """The ``(O, K)`` weight back from ``pack_weight``'s panels (a copy)."""
    if packed.dim() == 4:
        q, k2, nr, _ = packed.shape
        return packed.transpose(1, 2).reshape(q * nr, k2 * 2)
    q, K, nr = packed.shape
    return packed.transpose(1, 2).reshape(q * nr, K)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a ``(O, K)`` weight: ``(q, scale)`` with
    ``weight ~= q * scale[:, None]``, ``q`` in -127..127 and ``scale`` float32 ``(O,)``
    (max |w| of the row / 127; a zero row gets scale 1). Rows go a block at a time so a large
    layer needs no float32 copy of itself."""
    O = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(O, dtype=torch.float32, device=weight.device)
    step = max(1, (1 << 22) // max(1, weight.shape[1]))
    for r in range(0, O, step):
        w = weight[r:r + step].float()
        s = w.abs().amax(dim=1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[r:r + step] = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[r:r + step] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale[:, None]`` in ``dtype``: the weight an int8 layer stands for."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, mode: int | None = None,
                  silu_mul: bool = False) -> torch.Tensor | None:
    """``x @ W.T + bias`` for any number of rows, ``packed`` from ``pack_weight(W)``; for int8
    panels ``W = panels * scale[:, None]`` (``quantize_int8``). K-pair panels run
    ``bf16_gemm.c`` in ``mode`` (default ``pair_mode()``). ``silu_mul``: ``W`` is a gated
    MLP's gate and up projections interleaved (``interleave_gate_up``), and the result is
    ``silu(gate) * up`` (rows of ``O / 2``), formed as the sums are stored (K-pair panels
    only)."""
    pairs = packed.dim() == 4
    fn = _pairs_fn() if pairs else _packed_fn()
    K = packed.shape[1] * 2 if pairs else packed.shape[1]
    O = packed_features(packed)
    if fn is None or x.shape[-1] != K or x.numel() == 0 or (silu_mul and not pairs):
        return None
    x2 = x.reshape(-1, K).contiguous()
    if (not _f32_cpu(x2) or not _weight_cpu(packed)
            or (bias is not None and not _f32_cpu(bias))
            or (scale is not None) != (packed.dtype == torch.int8)
            or (scale is not None and (not _f32_cpu(scale) or scale.numel() != O))):
        return None
    Y = O // 2 if silu_mul else O
    y = x2.new_empty(x2.shape[0], Y)
    args = [x2.data_ptr(), packed.data_ptr(), None if bias is None else bias.data_ptr(),
            None if scale is None else scale.data_ptr(), y.data_ptr(), x2.shape[0], K, O,
            torch.get_num_threads(), _WTYPES[packed.dtype]]
    if pairs:
        args += [pair_mode() if mode is None else mode, int(silu_mul)]
    rc = fn(*args)
    return y.view(*x.shape[:-1], Y) if rc == 0 else None


GATE_UP_BLOCK = 32  # features of gate, then of up, in each 64-feature K-pair panel


def interleave_gate_up(w: torch.Tensor) -> torch.Tensor:
    """A gated MLP's merged ``(2 I, ...)`` gate and up rows (or their biases or scales) with
    gate and up alternating every ``GATE_UP_BLOCK`` rows: the order ``packed_linear``'s
    ``silu_mul`` reads (each K-pair panel holds a block of gate and the same block of up).
    ``I`` must be a multiple of the block."""
    two_i, rest = w.shape[0], w.shape[1:]
    blocks = two_i // 2 // GATE_UP_BLOCK
    return w.reshape(2, blocks, GATE_UP_BLOCK, *rest).transpose(0, 1).reshape(two_i, *rest)


def deinterleave_gate_up(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Gate then up again along ``dim`` of ``t``: the ``(..., 2 I)`` outputs of an interleaved
    weight, or (``dim=0``) ``interleave_gate_up``'s rows."""
    t = t.movedim(dim, -1)
    lead, two_i = t.shape[:-1], t.shape[-1]
    blocks = two_i // 2 // GATE_UP_BLOCK
    t = t.reshape(*lead, blocks, 2, GATE_UP_BLOCK).transpose(-3, -2).reshape(*lead, two_i)
    return t.movedim(-1, dim)


def sample_rows(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """One index per row of non-negative float32 ``weights`` (B, V), drawn by inverse CDF
    with ``u`` (B,) float64 uniforms in [0, 1) (``kernels/sampling.c``); -1 for a row whose
    total is not positive and finite."""
    fn = _sample_fn()
    weights = weights.contiguous()
    if (fn is None or weights.dim() != 2 or not _f32_cpu(weights) or u.dtype != torch.float64
            or u.shape != weights.shape[:1]):
        return None
    u = u.contiguous()
    out = torch.empty(weights.shape[0], dtype=torch.int64)
    fn(weights.data_ptr(), u.data_ptr(), out.data_ptr(), weights.shape[0], weights.shape[1],
       torch.get_num_threads())
    return out


def sample_logits(logits: torch.Tensor, row_max: torch.Tensor, temperature: torch.Tensor,
                  u: torch.Tensor) -> torch.Tensor | None:
    """``sample_rows(softmax(logits / temperature), u)`` without forming the softmax
    (``kernels/sampling.c``): finite float32 ``logits`` (B, V), ``row_max`` (B,) their row
    maxima, ``temperature`` (B,) > 0, ``u`` (B,) float64."""
    fn = _fn("sampling", "sample_logits", (_P, _P, _P, _P, _P, _I64, _I64, _I32))
    logits = logits.contiguous()
    if (fn is None or logits.dim() != 2 or not _f32_cpu(logits) or u.dtype != torch.float64
            or u.shape != logits.shape[:1]):
        return None
    row_max = row_max.to(torch.float32).contiguous()
    inv_t = (1.0 / temperature.to(torch.float32)).contiguous()
    u = u.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    if fn(logits.data_ptr(), row_max.data_ptr(), inv_t.data_ptr(), u.data_ptr(),
          out.data_ptr(), logits.shape[0], logits.shape[1], torch.get_num_threads()):
        return None
    return out


def row_argmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(argmax, max, min)`` of each row of float32 ``x`` (B, V) in one pass
    (``kernels/sampling.c``): the first index of the largest value, as ``torch.argmax``; a row
    holding a NaN has NaN max and min and index -1."""
    fn = _fn("sampling", "row_argmax", (_P, _P, _P, _P, _I64, _I64, _I32))
    x = x.contiguous()
    if fn is None or x.dim() != 2 or not _f32_cpu(x) or x.shape[1] == 0:
        return None
    B, V = x.shape
    idx = torch.empty(B, dtype=torch.int64)
    hi, lo = torch.empty(B), torch.empty(B)
    fn(x.data_ptr(), idx.data_ptr(), hi.data_ptr(), lo.data_ptr(), B, V,
       torch.get_num_threads())
    return idx, hi, lo


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rms_norm(x + residual) * weight, x + residual)`` in one pass over rows of ``x``."""
    fn = _elementwise_fn("add_rms_norm")
    x = x.contiguous()
    if residual is not None:
        residual = residual.contiguous()
    if (fn is None or x.dim() != 2 or not _f32_cpu(x, weight)
            or (residual is not None and (not _f32_cpu(residual) or residual.shape != x.shape))):
        return None
    total, out = torch.empty_like(x), torch.empty_like(x)
    fn(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
       total.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps, torch.get_num_threads())
    return out, total


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` for ``gate_up = cat([gate, up], -1)`` of shape ``(N, 2 I)``."""
    fn = _elementwise_fn("silu_mul")
    gate_up = gate_up.contiguous()
    if fn is None or gate_up.dim() != 2 or gate_up.shape[1] % 2 or not _f32_cpu(gate_up):
        return None
    n, i = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(n, i)
    fn(gate_up.data_ptr(), out.data_ptr(), n, i, torch.get_num_threads())
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> bool:
    """``k_cache.view(-1, *k.shape[1:])[slots] = k`` and the same for v, converting to the
    caches' dtype (float32, bfloat16 or float16) in one pass. ``k`` and ``v`` (N, nkv, hd)
    float32, each token's heads contiguous, tokens at any stride (the QKV output's views).
    False (nothing done) where the kernel does not apply."""
    fn = _elementwise_fn("write_kv")
    if fn is None or k.dim() != 3 or v.shape != k.shape or slots.dtype != torch.int64:
        return False
    n, nkv, hd = k.shape
    for t in (k, v):
        if not (t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(2) == 1
                and t.stride(1) == hd):
            return False
    if not (_weight_cpu(k_cache) and k_cache.dtype != torch.int8
            and v_cache.dtype == k_cache.dtype and v_cache.is_contiguous()
            and k_cache.shape[-2:] == (nkv, hd) and v_cache.shape == k_cache.shape
            and slots.shape == (n,)):
        return False
    slots = slots.contiguous()
    fn(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), n,
       nkv * hd, k.stride(0), v.stride(0), _WTYPES[k_cache.dtype], torch.get_num_threads())
    return True


def rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor) -> bool:
    """Rotate ``q`` (N, nh, hd) and ``k`` (N, nkv, hd) in place by ``positions``, tables
    ``cos``/``sin`` (P, hd). False (nothing done) where the kernel does not apply."""
    fn = _elementwise_fn("rotary")
    if fn is None or q.dim() != 3 or k.dim() != 3 or positions.dtype != torch.int64:
        return False
    n, nh, hd = q.shape
    for t in (q, k):  # each token's heads one contiguous run; tokens at any stride
        if not (t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(2) == 1
                and t.stride(1) == hd and t.shape[0] == n and t.shape[2] == hd):
            return False
    if not (_f32_cpu(cos, sin) and hd % 2 == 0):
        return False
    positions = positions.contiguous()
    fn(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), n,
       nh, k.shape[1], hd, q.stride(0), k.stride(0), torch.get_num_threads())
    return True


def pool_bags(rows: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
              base: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor | None:
    """``(B, F, D)`` float32 sums of the rows each id bag hits in ``rows`` (a DLRM rank's
    shards, float32 or 16-bit; ``kernels/embedding.c``): ``values`` int64 ids feature by
    feature, ``lengths`` ``(F, B)`` int64; per feature ``base`` (its first row in ``rows``, -1
    if not held), ``start`` (first table row held) and ``count`` (rows held), int64. Ids
    outside the rows held add nothing; ``None`` also when the lengths are negative or do not
    sum to the ids given."""
    fn = _fn("embedding", "pool_bags",
             (_P, _I32, _I64, _P, _I64, _P, _I64, _I64, _P, _P, _P, _P, _I32))
    if (fn is None or rows.dim() != 2 or not _weight_cpu(rows) or rows.dtype == torch.int8
            or any(t.dtype != torch.int64 or not t.is_contiguous() or t.device.type != "cpu"
                   for t in (values, lengths, base, start, count))):
        return None
    F, B = lengths.shape
    out = torch.empty(B, F, rows.shape[1], dtype=torch.float32)
    rc = fn(rows.data_ptr(), _WTYPES[rows.dtype], rows.shape[1], values.data_ptr(),
            values.numel(), lengths.data_ptr(), F, B, base.data_ptr(), start.data_ptr(),
            count.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out if rc == 0 else None
