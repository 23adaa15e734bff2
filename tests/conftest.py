"""Shared fixtures: random-weight checkpoints built once per session, and the check that no
worker process outlives the tests that started it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardserve import test_models

# Nothing is downloaded at run time: Hugging Face libraries must not even try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHM_CHECK = Path("/dev/shm").is_dir()


def worker_pids() -> list[int]:
    """Live shardserve worker processes that are children of this test process."""
    me, out = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        state = stat.rsplit(")", 1)[1].split()[0]
        if ppid == me and state != "Z" and b"shardserve.runtime.worker" in cmd:
            out.append(int(entry.name))
    return out


@pytest.fixture(autouse=True, scope="module")
def no_leftover_workers():
    """After each test module, every worker it started must be gone."""
    yield
    import gc

    gc.collect()  # executors dropped without close() are stopped by their finalizers
    left = worker_pids()
    assert not left, f"worker processes left running: {left}"
    stale = list(Path("/dev/shm").glob(f"shardserve-{os.getpid()}-*")) if SHM_CHECK else []
    assert not stale, f"shared-memory files left behind: {stale}"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight checkpoints of each family, keyed by arch."""
    root = tmp_path_factory.mktemp("models")
    return {arch: test_models.write(root / arch, arch, "tiny", seed=0)
            for arch in test_models.ARCHS}
