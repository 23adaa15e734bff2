"""The machine's limits, measured in the same run as a benchmark: float32 GEMM FLOP/s and
memory read bandwidth, both with every core this process may use."""

from __future__ import annotations

import time

import torch


def gemm_flops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def memory_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s read by a reduction over a buffer far larger than any cache (the measure
    ``shardserve calibrate`` uses)."""
    from shardserve.bench.calibrate import memory_gib_s

    return memory_gib_s(nbytes, reps) * 2**30


if __name__ == "__main__":
    print(f"gemm float32: {gemm_flops() / 1e9:.0f} GFLOP/s; "
          f"memory read: {memory_bandwidth() / 1e9:.1f} GB/s on {torch.get_num_threads()} threads")
