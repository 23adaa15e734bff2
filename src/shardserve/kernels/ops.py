"""The native kernels as tensor functions. Each returns ``None`` when it does not apply (no
compiler here, a dtype or shape it does not take) and the caller runs its PyTorch path."""

from __future__ import annotations

import ctypes
import functools

import torch

from shardserve import kernels

_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
SMALL_GEMM_MAX_ROWS = 8  # MAX_ROWS in small_gemm.c


@functools.cache
def _fn(lib: str, name: str, argtypes: tuple) -> ctypes._CFuncPtr | None:
    handle = kernels.load(lib)
    if handle is None:
        return None
    fn = getattr(handle, name)
    fn.restype, fn.argtypes = ctypes.c_int, list(argtypes)
    return fn


def _attention_fn():
    return _fn("paged_attention", "paged_decode_attention",
               (_P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32, _I32, _I64,
                ctypes.c_float, _I32))


def _gemm_fn():
    return _fn("small_gemm", "small_gemm", (_P, _P, _P, _P, _I32, _I64, _I64, _I32, _I32))


def available() -> bool:
    return _attention_fn() is not None and _gemm_fn() is not None


def _f32_cpu(*ts: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in ts)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           tables: torch.Tensor, context: torch.Tensor, num_kv_heads: int,
                           window: int | None, scale: float) -> torch.Tensor | None:
    """q (D, nh, hd) against the cache blocks in ``tables`` (D, nb) up to ``context`` (D,)."""
    fn = _attention_fn()
    q = q.contiguous()
    if (fn is None or not _f32_cpu(q, k_cache, v_cache)
            or tables.dtype != torch.int64 or context.dtype != torch.int64):
        return None
    tables, context = tables.contiguous(), context.contiguous()
    out = torch.empty_like(q)
    D, nh, hd = q.shape
    rc = fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            context.data_ptr(), out.data_ptr(), D, tables.shape[1], nh, num_kv_heads, hd,
            k_cache.shape[1], window or 0, scale, torch.get_num_threads())
    return out if rc == 0 else None


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 transposed: bool = False) -> torch.Tensor | None:
    """``x @ weight.T + bias`` for 1..8 rows of x (weight ``(O, K)``, or ``(K, O)`` when
    ``transposed``), every thread streaming its own slice of the weights."""
    if x.dim() != 2 or not 1 <= x.shape[0] <= SMALL_GEMM_MAX_ROWS or torch.is_grad_enabled():
        return None
    fn = _gemm_fn()
    x = x.contiguous()
    if fn is None or not _f32_cpu(x, weight) or (bias is not None and not _f32_cpu(bias)):
        return None
    N, K = x.shape
    O = weight.shape[1] if transposed else weight.shape[0]
    y = x.new_empty(N, O)
    rc = fn(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(),
            y.data_ptr(), N, K, O, int(transposed), torch.get_num_threads())
    return y if rc == 0 else None
