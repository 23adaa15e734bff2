"""``shardserve calibrate``: measure this machine and write a ``local`` hardware profile, the
numbers ``planner/cost.py`` predicts step times from.

A CPU device here is a share of the cores (``--devices cpu:N``: N workers of cores / N threads
each), so everything is measured for each split N that divides the cores (1, 2, 4, ...):

- **linear layers** as the engine runs them (``layers.linear``, weights packed at load as the
  model runner packs them), in picoseconds per weight for each weight format the kernels serve
  here (float32, bfloat16, float16, int8) and each row count a step meets (1 for batch-1
  decode up to 512 for prefill). The weights cycle through a working set far larger than the
  caches, as a model's do. Measured to be shape-independent within about 10% (768 x 768 to
  32000 x 768) and nearly affine in rows, so one curve per format serves every layer;
- **all-reduce** (N > 1) through the workers' own group (shared memory between the ranks),
  latency and bandwidth fitted to sizes from one row of a small model to 512 rows of a large
  one;
- **the rest of a step**, fitted by non-negative least squares on relative error to the
  engine's own step times on random-weight probe models (wide enough to stream from memory,
  shallow and deep, small and real vocabularies, two widths, two decode contexts), in float32
  and in bfloat16 checkpoints: a factor on each part of the linear time (the one-row part,
  memory-bound, and what more rows add), and a cost per step, per sequence, per sequence and
  vocabulary entry (sampling), per layer (dispatch, norms), per activation element, per byte
  of KV cache a decode reads and per FLOP of prefill attention. The probe steps are kept in
  the profile beside the fit;
- memory read bandwidth (a reduction over 1 GiB, past every cache).

Workers run one at a time for the linear curves (two workers of one core each measured within
3% of one alone on a 2-core Xeon; other machines may share their memory bandwidth worse).
The profile (``~/.cache/shardserve/hardware/local.yaml``, or ``--out``) has the schema of the
shipped ones plus ``cpu_splits``, its ``source`` saying when and on what it was measured.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = (1, 4, 16, 64, 128, 256, 512)
FORMATS = ("float32", "bfloat16", "float16", "int8")


def _served_formats() -> list[str]:
    """Every weight format when the native kernels are built (they take each one); float32
    alone otherwise (PyTorch's 16-bit matmuls are not what the engine would run)."""
    from shardserve.kernels import ops

    return list(FORMATS) if ops.packed_width() is not None else ["float32"]


def linear_ps_per_weight(fmt: str, rows: tuple[int, ...], working_set: int, side: int,
                         min_s: float) -> dict[int, float]:
    """Picoseconds per weight of ``layers.linear`` at each row count, over square weights of
    ``side`` that together fill ``working_set`` bytes (so each call streams its weight from
    memory, as a model's layers do)."""
    import torch

    from shardserve.layers.linear import linear, pack_in_place

    dtype = torch.float32 if fmt in ("float32", "int8") else getattr(torch, fmt)
    per = side * side * (1 if fmt == "int8" else dtype.itemsize)
    weights, scales = [], []
    for _ in range(max(2, working_set // per)):
        w = torch.nn.Parameter(torch.randn(side, side).to(dtype), requires_grad=False)
        scales.append(pack_in_place(w, "int8" if fmt == "int8" else None))
        weights.append(w)
    out = {}
    for r in rows:
        x = torch.randn(r, side)
        for w, s in zip(weights, scales, strict=True):
            linear(x, w, scale=s)
        best, t_end = float("inf"), time.perf_counter() + min_s
        while time.perf_counter() < t_end or best == float("inf"):
            t0 = time.perf_counter()
            for w, s in zip(weights, scales, strict=True):
                linear(x, w, scale=s)
            best = min(best, (time.perf_counter() - t0) / len(weights))
        out[r] = round(best / (side * side) * 1e12, 2)
    return out


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


# Probe models: wide enough that their weights stream from memory as a real model's do (a
# probe held in cache would run its matmuls faster than the curve says), shallow or deep,
# with a small or a real vocabulary, so the fit can tell per-layer costs from per-step ones.
_PROBE = dict(hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
              intermediate_size=4096, max_position_embeddings=1024)
_PROBES = {"l4v512": dict(num_hidden_layers=4, vocab_size=512),
           "l12v512": dict(num_hidden_layers=12, vocab_size=512),
           "l4v32k": dict(num_hidden_layers=4, vocab_size=32000),
           # half as wide, deeper: a layer's fixed costs against its weights'
           "narrow": dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=8,
                          intermediate_size=2048, num_hidden_layers=16, vocab_size=512)}
# --quick (tests): the same probes, narrow (held in cache: the fit is only exercised)
_QUICK = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=512)


def _write_probe(root: Path, name: str, dtype: str, quick: bool) -> Path:
    from shardserve import test_models

    shape = {**_PROBE, **_PROBES[name], **(_QUICK if quick else {})}
    return test_models.write(root / dtype / name, "llama", "llama-110m", dtype=dtype,
                             tokenizer=False, overrides=shape)


def _all_reduce_fit(samples: list[tuple[int, float]]) -> dict:
    """Latency (us) and bandwidth (GiB/s) fitted to (bytes, seconds) all-reduce timings."""
    a = np.array([[1.0, b] for b, _ in samples])
    y = np.array([s for _, s in samples])
    (lat, per_byte), *_ = nnls(a, y, 1 / y)
    return {"latency_us": round(float(lat) * 1e6, 2),
            "gib_s": round(1 / float(per_byte) / 2**30, 2) if per_byte > 0 else None}


def nnls(a: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray]:
    """Least squares with every coefficient >= 0 (columns whose unconstrained fit goes
    negative are dropped one at a time: a physical cost is never negative), each row weighted
    by ``w`` (1 / the measured step: relative error, so a 2 ms step counts as much as a
    200 ms one)."""
    w = np.ones(len(y)) if w is None else w
    keep = list(range(a.shape[1]))
    while True:
        x = np.zeros(a.shape[1])
        if keep:
            x[keep] = np.linalg.lstsq(a[:, keep] * w[:, None], y * w, rcond=None)[0]
        neg = [i for i in keep if x[i] < 0]
        if not neg:
            return (x,)
        keep.remove(min(neg, key=lambda i: x[i]))


def _probe_split(n: int, root: Path, curves: dict, dtypes: list[str], quick: bool,
                 max_batch: int | None = None) -> dict:
    """Fit the engine-time coefficients for each dtype (the KV cache's, and the checkpoint's
    that sets it) and, for n > 1, the all-reduce, at ``cpu:n``; decode probes of at most
    ``max_batch`` sequences when given."""
    from shardserve import LLM
    from shardserve.bench.steps import measure
    from shardserve.config import ModelConfig

    out: dict = {"overhead": {}}
    if n > 1:
        with LLM(str(root / "float32" / "l4v512"), tensor_parallel_size=n,
                 devices=f"cpu:{n}") as llm:
            samples = []
            for numel in (512, 4096, 32768, 262144, 1 << 20):
                secs = max(llm.engine.executor.collective_rpc(
                    "time_all_reduce", numel=numel, reps=20 if quick else 50))
                samples.append((4 * numel, secs))
        out["all_reduce"] = _all_reduce_fit(samples)
    out["probe_steps"] = {}
    for dtype in dtypes:
        points = []
        for name, ctxs, prefills, batches in _plan_probes(quick):
            path = root / dtype / name
            batches = tuple(b for b in batches if max_batch is None or b <= max_batch)
            for ctx in ctxs:
                m = measure(path, tp=n, prefills=prefills if ctx == ctxs[0] else (),
                            batches=batches, context=ctx, steps=4 if quick else 12,
                            reps=2 if quick else 3,
                            vocab=ModelConfig(str(path)).spec.vocab_size)
                points += [[name, "prefill", 1, p, round(m["prefill_ms"][p], 3)]
                           for p in m["prefill_ms"]]
                points += [[name, "decode", b, m["decode_context"][b],
                            round(m["decode_ms"][b], 3)] for b in m["decode_ms"]]
        out["probe_steps"][dtype] = points
        specs = {name: ModelConfig(str(root / dtype / name)).spec for name in _PROBES}
        out["overhead"][dtype] = fit_engine_time(points, specs, n, dtype, curves,
                                                 out.get("all_reduce"))
    return out


def _plan_probes(quick: bool) -> list[tuple[str, tuple[int, ...], tuple[int, ...],
                                            tuple[int, ...]]]:
    """What each probe runs: (name, decode contexts, prefill lengths, decode batches). The
    deep probe decodes at two contexts, so KV reads tell apart from per-layer costs."""
    if quick:
        return [(name, (128,), (64,), (1, 16)) for name in _PROBES]
    return [("l4v512", (128,), (128, 512), (1, 16, 64)),
            ("l12v512", (128, 512), (128, 512), (1, 16, 64)),
            ("l4v32k", (128,), (128,), (1, 16, 64)),
            ("narrow", (128,), (128, 512), (1, 16, 64))]


def fit_engine_time(points: list[list], specs: dict, n: int, dtype: str, curves: dict,
                    all_reduce: dict | None) -> dict:
    """The engine-time coefficients (``cost.OVERHEAD_TERMS``) that best explain measured
    steps ``[probe, kind, seqs, length, ms]`` of models ``specs`` at ``cpu:n``, beside the
    linear curves and the all-reduce: non-negative least squares on relative error."""
    from shardserve.planner import cost

    rates = cost.Rates(linear_ps=curves, all_reduce=all_reduce)
    rows, y, known = [], [], []
    for name, kind, seqs, length, ms in points:
        shape = cost.StepShape(kind, int(seqs), round(length))
        spec = specs[name]
        rows.append(cost.time_features(spec, n, dtype, dtype, shape, rates))
        known.append(cost.all_reduce_s(spec, n, shape, rates))
        y.append(ms / 1e3)
    y = np.array(y)
    (coef,) = nnls(np.array(rows), y - np.array(known), 1 / y)
    return {k: round(float(c * unit), 4) for (k, unit), c in
            zip(cost.OVERHEAD_TERMS.items(), coef, strict=True)}


def calibrate(out: Path, quick: bool = False, splits: list[int] | None = None,
              formats: list[str] | None = None, max_batch: int | None = None) -> dict:
    """Measure and write the profile; returns it. ``splits`` (cpu:N), ``formats``
    (weights) and ``max_batch`` (the largest decode batch probed, of 1, 16 and 64) narrow
    what is measured (default: every one this machine has, every batch): a profile for
    smaller batches only, in a third of the time."""
    import torch
    import yaml

    cores = len(os.sched_getaffinity(0))
    splits = splits or [n for n in (1, 2, 4, 8) if n <= cores and cores % n == 0]
    if quick:
        splits = splits[:2]
    rows = (1, 16, 64, 512) if quick else ROWS
    side, ws, min_s = (512, 32 << 20, 0.02) if quick else (2048, 256 << 20, 0.2)
    formats = [f for f in _served_formats() if formats is None or f in formats]
    threads0 = torch.get_num_threads()
    cpu_splits: dict[int, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="shardserve-calibrate-") as tmp:
            root = Path(tmp)
            dtypes = [d for d in ("float32", "bfloat16") if d in formats][:1 if quick else 2]
            for dtype in dtypes:
                for name in _PROBES:
                    _write_probe(root, name, dtype, quick)
            for n in splits:
                torch.set_num_threads(max(1, cores // n))
                curves = {f: linear_ps_per_weight(f, rows, ws, side, min_s) for f in formats}
                torch.set_num_threads(threads0)
                cpu_splits[n] = {"threads": max(1, cores // n), "linear_ps_per_weight": curves,
                                 **_probe_split(n, root, curves, dtypes, quick, max_batch)}
    finally:
        torch.set_num_threads(threads0)
    one = cpu_splits[1]["linear_ps_per_weight"]
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    profile = {
        "device": f"{_cpu_name()}, {cores} cores",
        "kind": "cpu",
        "devices_per_node": max(splits),
        "memory_per_device": host // max(splits),
        # best throughput of each curve at cpu:1, in TFLOP/s (2 FLOPs a weight a row)
        "tflops": {f: round(max(2 * r / ps for r, ps in c.items()), 4)
                   for f, c in one.items() if f != "int8"},
        "memory_bandwidth_gib_s": round(memory_gib_s(1 << 28 if quick else 1 << 30), 2),
        "link_bandwidth_gib_s": None,
        "source": f"measured by shardserve calibrate{' --quick' if quick else ''} on "
                  f"{datetime.date.today().isoformat()}: {_cpu_name()}, torch "
                  f"{torch.__version__}; linear layers of {side} x {side} weights cycling "
                  f"through {ws >> 20} MiB",
        "cpu_splits": cpu_splits,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({"profiles": {"local": profile}}, sort_keys=False))
    return profile
