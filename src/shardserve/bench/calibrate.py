"""``shardserve calibrate``: measure this machine and write a ``local`` hardware profile.

What it measures, with every core this process may use:

- the linear layers' throughput as the engine runs them (``layers.linear``: weights packed
  at load as the model runner packs them, the native kernels where built), for each weight
  dtype the kernels serve here and each row count a step meets (1 for batch-1 decode, up to
  512 for prefill), in TFLOP/s: a step's matmul time is far from one peak figure on a CPU,
  so the profile keeps the curve;
- memory read bandwidth (a reduction over 1 GiB, far past every cache).

The profile (``~/.cache/shardserve/hardware/local.yaml``, or ``--out``) has the schema of the
shipped ones, its ``source`` saying when and on what it was measured, and ``tflops`` the
best of each dtype's curve. ``shardserve plan --hardware local`` reads it. Collective
latency and per-step overhead are not measured yet (the cost model that would use them is
issue 14's next step).
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

ROWS = (1, 16, 64, 256, 512)


def _linear_tflops(dtype: str, rows: int, n: int, min_s: float) -> float:
    import torch

    from shardserve.layers.linear import linear, pack_in_place

    w = torch.nn.Parameter(torch.randn(n, n).to(getattr(torch, dtype)), requires_grad=False)
    pack_in_place(w, None)
    x = torch.randn(rows, n)
    linear(x, w)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        linear(x, w)
        reps += 1
    return 2 * rows * n * n * reps / (time.perf_counter() - t0) / 1e12


def memory_gib_s(nbytes: int = 1 << 30, reps: int = 4) -> float:
    import torch

    x = torch.ones(nbytes // 4)
    x.sum()
    t0 = time.perf_counter()
    for _ in range(reps):
        x.sum()
    return nbytes * reps / (time.perf_counter() - t0) / 2**30


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def calibrate(out: Path, quick: bool = False) -> dict:
    """Measure and write the profile; returns it."""
    import torch
    import yaml

    from shardserve.kernels import ops

    n, min_s = (512, 0.05) if quick else (2048, 0.5)
    dtypes = ["float32"] + (["bfloat16"] if ops.linear_path("bfloat16") else [])
    curve = {d: {r: round(_linear_tflops(d, r, n, min_s), 4) for r in ROWS} for d in dtypes}
    cores = len(os.sched_getaffinity(0))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    profile = {
        "device": f"{_cpu_name()}, {cores} cores",
        "kind": "cpu",
        "devices_per_node": 1,
        "memory_per_device": host,
        "tflops": {d: max(c.values()) for d, c in curve.items()},
        "tflops_by_rows": curve,
        "memory_bandwidth_gib_s": round(memory_gib_s(1 << 28 if quick else 1 << 30), 2),
        "link_bandwidth_gib_s": None,
        "source": f"measured by shardserve calibrate on "
                  f"{datetime.date.today().isoformat()}: linear layers of {n} x {n} "
                  f"(torch {torch.__version__}, {torch.get_num_threads()} threads)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({"profiles": {"local": profile}}, sort_keys=False))
    return profile
