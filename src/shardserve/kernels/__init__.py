"""Small native kernels for CPUs, compiled on first use with the system C compiler.

Each kernel is one C file beside this module (and the ``*.h`` it shares), built with ``-O3
-march=native -fopenmp`` into a shared library under ``~/.cache/shardserve/kernels``
(``SHARDSERVE_KERNEL_CACHE`` moves it), keyed by the sources, the flags and the host CPU, and
called through ``ctypes`` with tensor data pointers. OpenMP resolves to the ``libgomp`` PyTorch
has already loaded, so kernels and PyTorch share one thread pool. With no compiler, or
``SHARDSERVE_KERNELS=0``, ``load`` returns ``None`` and callers keep their plain-PyTorch path.

Loading a shared library runs its code, so the cache folder is created 0700 and a folder or
library owned by another user, or writable by group or others, is refused (the PyTorch path
runs, and the log says why): nobody else can plant a library under the predictable name.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu11"]


def _cache_dir() -> Path:
    env = os.environ.get("SHARDSERVE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "shardserve" / "kernels"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [x for x in text.splitlines() if x.startswith(("flags", "model name"))]
    return "\n".join(sorted(set(lines)))


def _build(name: str) -> Path:
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256(b"\0".join([source.read_bytes(), *headers, " ".join(_FLAGS).encode(),
                                     compiler.encode(), _cpu_id().encode()])).hexdigest()[:16]
    out = _private_dir(_cache_dir()) / f"{name}-{key}.so"
    if out.exists():
        return _owned(out)
    # Build beside the target and rename: concurrent builders (two workers) never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(source), "-lm"],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {source.name}: {res.stderr.strip()[:2000]}")
        os.chmod(tmp, 0o700)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return _owned(path)


def _owned(path: Path) -> Path:
    """``path`` if this user owns it, it is no symlink and only this user may write it."""
    st = os.lstat(path)
    if os.path.islink(path) or st.st_uid != os.getuid():
        raise RuntimeError(f"{path} is not owned by this user (or is a link): not loading "
                           "native code from it")
    if st.st_mode & 0o022:
        raise RuntimeError(f"{path} is writable by group or others (mode "
                           f"{oct(st.st_mode & 0o777)}): not loading native code from it; "
                           f"run chmod go-w {path}")
    return path


KERNELS = ("gemm", "bf16_gemm", "small_gemm", "paged_attention", "elementwise", "sampling",
           "embedding")


@functools.cache
def status() -> tuple[bool, str]:
    """(every kernel is built and loads, one line saying which or why not). Builds them on
    the first call (a few seconds; ``python -m shardserve.kernels`` does it ahead)."""
    if os.environ.get("SHARDSERVE_KERNELS", "1") == "0":
        return False, "SHARDSERVE_KERNELS=0"
    failed = []
    for name in KERNELS:
        try:
            import torch  # noqa: F401  (as in load)

            ctypes.CDLL(str(_build(name)))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            failed.append(f"{name}: {str(e).splitlines()[0][:200]}")
    if failed:
        return False, "; ".join(failed)
    isa = "AVX-512" if "avx512f" in _cpu_id() else "AVX2" if "avx2" in _cpu_id() else \
        platform.machine()
    from shardserve.kernels import ops

    rate = f"vdpbf16ps at {ops.dp_rate():.1f}x float32 FMA's rate"
    bf16 = {2: "AMX", 1: rate}.get(ops.pair_mode(), "widened to float32")
    if ops.pair_mode() == 0 and ops.cpu_pair_mode() == 1:
        bf16 += f": {rate}"  # there, but not taken: too slow, or turned off
    return True, f"{', '.join(KERNELS)} built for {isa} (bfloat16: {bf16}) in {_cache_dir()}"


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``name`` (a C file in this folder), or ``None`` where it
    cannot be built here; the reason is logged once."""
    if os.environ.get("SHARDSERVE_KERNELS", "1") == "0":
        return None
    import torch  # noqa: F401  (its libgomp must be loaded first, so the kernels share it)

    try:
        return ctypes.CDLL(str(_build(name)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native kernel %s unavailable, using the PyTorch path: %s", name, e)
        return None
