"""Shared fixtures: random-weight checkpoints built once per session, and the check that no
worker process outlives the tests that started it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shardserve import test_models

# Nothing is downloaded at run time: Hugging Face libraries must not even try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHM_CHECK = Path("/dev/shm").is_dir()


def our_processes(root: int, module: bytes = b"shardserve.runtime.worker") -> dict[str, int]:
    """{label: pid} of the live processes below ``root`` (children, grandchildren: workers
    are children of an engine core) started as ``python -m MODULE ... LABEL``."""
    parents, argvs = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)], argvs[int(entry.name)] = int(fields[1]), argv
    out = {}
    for pid, argv in argvs.items():
        up = parents.get(pid)
        while up is not None and up != root:
            up = parents.get(up)
        if up == root and module in argv:
            out[(argv[-2] if argv[-1] == b"" else argv[-1]).decode()] = pid
    return out


def worker_pids() -> list[int]:
    """Live shardserve workers and engine cores started (at any depth) by this process."""
    me = os.getpid()
    return [*our_processes(me).values(),
            *our_processes(me, b"shardserve.engine.core").values()]


def shm_leftovers(since: float) -> list[Path]:
    """Shared-memory files of our groups made since ``since`` (a time.time()) and still there.
    (Named by the creating process, which may be an engine core; the tests run one at a
    time, so the time tells ours apart.)"""
    if not SHM_CHECK:
        return []
    out = []
    for p in Path("/dev/shm").glob("shardserve-*"):
        try:
            if p.stat().st_mtime >= since - 1:
                out.append(p)
        except FileNotFoundError:  # unlinked meanwhile: fine
            pass
    return out


@pytest.fixture(autouse=True, scope="module")
def no_leftover_workers():
    """After each test module, every worker and engine core it started must be gone."""
    start = time.time()
    yield
    import gc

    gc.collect()  # executors dropped without close() are stopped by their finalizers
    left = worker_pids()
    assert not left, f"worker processes left running: {left}"
    stale = shm_leftovers(start)
    assert not stale, f"shared-memory files left behind: {stale}"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight checkpoints of each family, keyed by arch."""
    root = tmp_path_factory.mktemp("models")
    return {arch: test_models.write(root / arch, arch, "tiny", seed=0)
            for arch in test_models.ARCHS}
