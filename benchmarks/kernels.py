"""The native CPU kernels against the PyTorch paths they replace, in one run, same threads.

    python benchmarks/kernels.py [--threads 2]

1. Paged decode attention (llama-110m heads: 12 query heads, 4 KV heads, head_dim 64, blocks of
   16 tokens in random order): ``CPUPagedBackend`` against ``TorchSDPABackend`` (gather each
   sequence's blocks, one padded SDPA call), per layer call.
2. Prefill attention of a whole prompt (same heads; 16 to 2048 tokens, causal): the native
   kernel (``kernels/prefill_attention.c``, up to 1024 keys) against PyTorch's flash kernel
   (``scaled_dot_product_attention`` with a batch dimension, GQA), q, k and v as views of one
   QKV output, as a layer hands them over.
3. Linear layers from 1 to 2048 rows, weights cold (each call takes the next of several
   copies, 256 MB in all, more than the caches hold): ``F.linear`` (PyTorch's GEMM, MKL here)
   against the packed GEMM (``kernels/gemm.c``, weights repacked once as at load time), at
   1-8 rows the small-batch kernel for weights left unpacked (``kernels/small_gemm.c``), and
   oneDNN's float32 GEMM with weights prepacked once for the row count
   (``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``: the library vLLM's
   CPU backend runs its linear layers on).
4. The same layers with bfloat16 weights (``--bf16``; needs AVX512-BF16): the CPU's bfloat16
   dot products on K-pair panels (``kernels/bf16_gemm.c``: AMX tiles, and its vdpbf16ps
   loop, which the int8 layers' few-row calls take) against oneDNN's bf16 matmul through
   ``F.linear`` on bfloat16 activations (AMX / AVX512-BF16 too), and against the kernel that
   reads bfloat16 weights into float32 registers (``gemm.c``, the path of CPUs without
   bfloat16 dot products).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from shardserve.kernels import ops
from shardserve.layers.attention import (
    Attention,
    AttentionMetadata,
    CPUPagedBackend,
    TorchSDPABackend,
)


def timed(fn, n: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def attention_rows() -> list[str]:
    nh, nkv, hd, bs = 12, 4, 64, 16
    rows = []
    for D, ctx_max in [(1, 256), (1, 2048), (16, 768), (64, 256), (64, 768)]:
        g = torch.Generator().manual_seed(0)
        per_seq = ctx_max // bs
        num_blocks = D * per_seq
        attn = Attention(nh, nkv, hd)
        attn.k_cache = torch.randn(num_blocks, bs, nkv, hd, generator=g)
        attn.v_cache = torch.randn(num_blocks, bs, nkv, hd, generator=g)
        tables = torch.randperm(num_blocks, generator=g).view(D, per_seq)
        context = torch.randint(ctx_max // 2, ctx_max + 1, (D,), generator=g)
        meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), D, tables, context)
        q = torch.randn(D, nh, hd, generator=g)
        base = timed(lambda: TorchSDPABackend()._decode(attn, q, meta), 30)  # noqa: B023
        ours = timed(lambda: CPUPagedBackend()._decode(attn, q, meta), 30)  # noqa: B023
        kv_bytes = 2 * int(context.sum()) * nkv * hd * 4
        rows.append(f"| {D} | {ctx_max // 2}..{ctx_max} | {base * 1e3:.3f} | {ours * 1e3:.3f} | "
                    f"{base / ours:.2f}x | {kv_bytes / ours / 1e9:.1f} |")
    return rows


def prefill_rows() -> list[str]:
    nh, nkv, hd = 12, 4, 64
    rows = []
    for n in (16, 128, 512, 1024, 2048):
        g = torch.Generator().manual_seed(n)
        qkv = torch.randn(n, (nh + 2 * nkv) * hd, generator=g)
        q = qkv[:, :nh * hd].view(n, nh, hd)
        k = qkv[:, nh * hd:(nh + nkv) * hd].view(n, nkv, hd)
        v = qkv[:, (nh + nkv) * hd:].view(n, nkv, hd)

        def sdpa():
            return F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None],  # noqa: B023
                v.transpose(0, 1)[None], is_causal=True, scale=hd ** -0.5,  # noqa: B023
                enable_gqa=True)
        reps = max(3, 4000 // n)
        base = timed(sdpa, reps)
        ours = ops.prefill_attention(q, k, v, None, hd ** -0.5)
        if ours is None:
            rows.append(f"| {n} | {base * 1e3:.3f} | - (past the kernel's cap) | - |")
            continue
        want = sdpa()[0].transpose(0, 1)
        assert torch.allclose(ours, want, atol=1e-5, rtol=1e-4)
        ours = timed(lambda: ops.prefill_attention(q, k, v, None, hd ** -0.5), reps)  # noqa: B023
        rows.append(f"| {n} | {base * 1e3:.3f} | {ours * 1e3:.3f} | {base / ours:.2f}x |")
    return rows


def linear_rows() -> list[str]:
    rows = []
    shapes = [("qkv 110m", 2304, 768), ("down 110m", 768, 2048), ("LM head 110m", 32000, 768),
              ("gate_up TinyLlama", 11264, 2048)]
    for name, O, K in shapes:
        copies = max(2, (256 << 20) // (4 * O * K))  # cycle through more than the caches hold
        ws = [torch.randn(O, K) for _ in range(copies)]
        packed = [ops.pack_weight(w) for w in ws]
        for N in (1, 4, 8, 16, 64, 256, 2048):
            onednn = [torch.ops.mkldnn._reorder_linear_weight(w, N) for w in ws]
            x = torch.randn(N, K)
            it = iter(range(10**9))
            pick = lambda ws: ws[next(it) % copies]  # noqa: E731, B023
            n = max(3, min(20, int(2e10 / (2 * N * K * O))))
            with torch.inference_mode():
                base = timed(lambda: F.linear(x, pick(ws)), n)  # noqa: B023
                small = (timed(lambda: ops.small_linear(x, pick(ws)), n)  # noqa: B023
                         if N <= ops.SMALL_GEMM_MAX_ROWS else None)
                ours = timed(lambda: ops.packed_linear(x, pick(packed)), n)  # noqa: B023
                dnn = timed(lambda: torch.ops.mkldnn._linear_pointwise(  # noqa: B023
                    x, pick(onednn), None, "none", [], ""), n)  # noqa: B023
            rate = (f"{4 * O * K / ours / 1e9:.1f} GB/s" if N <= 8 else
                    f"{2 * N * K * O / ours / 1e9:.0f} GFLOP/s")
            rows.append(f"| {name} | {O}x{K} | {N} | {base * 1e3:.3f} | "
                        f"{'-' if small is None else f'{small * 1e3:.3f}'} | {ours * 1e3:.3f} | "
                        f"{base / ours:.2f}x | {dnn * 1e3:.3f} | {dnn / ours:.2f}x | {rate} |")
    return rows


def _packed(ws: list[torch.Tensor], setting: str) -> list[torch.Tensor]:
    """``ws`` packed as under ``SHARDSERVE_BF16_GEMM=setting`` (on: K-pair panels, off: the
    float32-register layout)."""
    import os

    os.environ["SHARDSERVE_BF16_GEMM"] = setting
    ops.pair_mode.cache_clear()
    try:
        return [ops.pack_weight(w) for w in ws]
    finally:
        os.environ.pop("SHARDSERVE_BF16_GEMM")
        ops.pair_mode.cache_clear()


def bf16_rows() -> list[str]:
    rows = []
    amx = ops.cpu_pair_mode() == 2
    shapes = [("qkv 110m", 2304, 768), ("down 110m", 768, 2048), ("LM head 110m", 32000, 768)]
    for name, O, K in shapes:
        copies = max(2, (256 << 20) // (2 * O * K))
        ws = [torch.randn(O, K).bfloat16() for _ in range(copies)]
        pairs, widened = _packed(ws, "on"), _packed(ws, "off")
        for N in (1, 4, 16, 64, 128, 512, 2048):
            x = torch.randn(N, K)
            xb = x.bfloat16()
            it = iter(range(10**9))
            pick = lambda ws: ws[next(it) % copies]  # noqa: E731, B023
            n = max(3, min(20, int(4e10 / (2 * N * K * O))))
            with torch.inference_mode():
                dnn = timed(lambda: F.linear(xb, pick(ws)), n)  # noqa: B023
                tiles = (timed(lambda: ops.packed_linear(x, pick(pairs), mode=2), n)  # noqa: B023
                         if amx else None)
                dp = timed(lambda: ops.packed_linear(x, pick(pairs), mode=1), n)  # noqa: B023
                wide = timed(lambda: ops.packed_linear(x, pick(widened)), n)  # noqa: B023
            ours = tiles or dp
            rate = (f"{2 * O * K / ours / 1e9:.1f} GB/s" if N <= 4 else
                    f"{2 * N * K * O / ours / 1e9:.0f} GFLOP/s")
            rows.append(f"| {name} | {O}x{K} | {N} | {dnn * 1e3:.3f} | "
                        f"{'-' if tiles is None else f'{tiles * 1e3:.3f}'} | {dp * 1e3:.3f} | "
                        f"{wide * 1e3:.3f} | {wide / dp:.2f}x | {dnn / ours:.2f}x | {rate} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="only the bfloat16 section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not ops.available():
        raise SystemExit("the native kernels do not build here (see the log for why)")
    print(f"{args.threads} threads\n")
    if args.bf16:
        if ops.cpu_pair_mode() < 1:
            raise SystemExit("no AVX512-BF16 on this CPU: bfloat16 runs in float32 registers")
        print(f"bfloat16 weights run on: {ops.linear_path('bfloat16')}\n"
              f"vdpbf16ps / float32 FMA products a cycle: {ops.dp_rate():.2f}\n")
        print("| layer | out x in | rows | oneDNN bf16 ms | AMX ms | vdpbf16ps ms | "
              "float32-register ms | vdpbf16ps / float32-register | oneDNN / ours (AMX, "
              "else vdpbf16ps) | our rate |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(bf16_rows()))
        return
    print("| sequences | context | gather + SDPA ms | native ms | speedup | KV read GB/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(attention_rows()), flush=True)
    print("\n| prompt tokens | SDPA (flash) ms | native ms | speedup |")
    print("|---|---|---|---|")
    print("\n".join(prefill_rows()), flush=True)
    print("\n| layer | out x in | rows | PyTorch ms | small-batch ms | packed ms | packed / "
          "PyTorch | oneDNN ms | packed / oneDNN | packed rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(linear_rows()))


if __name__ == "__main__":
    main()
