"""The native CPU kernels against the PyTorch paths they replace, in one run, same threads.

    python benchmarks/kernels.py [--threads 2]

1. Paged decode attention (llama-110m heads: 12 query heads, 4 KV heads, head_dim 64, blocks of
   16 tokens in random order): ``CPUPagedBackend`` against ``TorchSDPABackend`` (gather each
   sequence's blocks, one padded SDPA call), per layer call.
2. Small-batch linear, 1, 4 and 8 rows, weights cold (each call takes the next of several
   copies, 256 MB in all, more than the caches hold): the native kernel against ``F.linear``
   (``x @ W`` for the LM head, stored transposed).
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


def linear_rows() -> list[str]:
    rows = []
    shapes = [("qkv 110m", 2304, 768, False), ("down 110m", 768, 2048, False),
              ("LM head 110m (H, V)", 32000, 768, True), ("gate_up TinyLlama", 11264, 2048, False)]
    for name, O, K, transposed in shapes:
        copies = max(2, (256 << 20) // (4 * O * K))  # cycle through more than the caches hold
        ws = [torch.randn((K, O) if transposed else (O, K)) for _ in range(copies)]
        for N in (1, 4, 8):
            x = torch.randn(N, K)
            it = iter(range(10**9))
            pick = lambda: ws[next(it) % copies]  # noqa: E731, B023
            if transposed:
                base = timed(lambda: x @ pick(), 20)  # noqa: B023
            else:
                base = timed(lambda: F.linear(x, pick()), 20)  # noqa: B023
            with torch.inference_mode():
                ours = timed(lambda: ops.small_linear(x, pick(), None, transposed), 20)  # noqa: B023
            rows.append(f"| {name} | {O}x{K} | {N} | {base * 1e3:.3f} | {ours * 1e3:.3f} | "
                        f"{base / ours:.2f}x | {4 * O * K / ours / 1e9:.1f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not ops.available():
        raise SystemExit("the native kernels do not build here (see the log for why)")
    print(f"{args.threads} threads\n")
    print("| sequences | context | gather + SDPA ms | native ms | speedup | KV read GB/s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(attention_rows()), flush=True)
    print("\n| layer | out x in | rows | PyTorch ms | native ms | speedup | weights GB/s |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(linear_rows()))


if __name__ == "__main__":
    main()
