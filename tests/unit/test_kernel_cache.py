"""Native code is loaded only from a cache folder (and files) that this user owns and nobody
else may write: a planted library under the predictable name is never loaded."""

import os

import pytest

from shardserve import kernels


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "kernels"
    monkeypatch.setenv("SHARDSERVE_KERNEL_CACHE", str(folder))
    return folder


def test_the_cache_folder_is_created_private(cache):
    kernels._private_dir(cache)
    assert oct(cache.stat().st_mode & 0o777) == oct(0o700 & ~_umask())


def test_a_folder_others_may_write_is_refused(cache):
    cache.mkdir()
    os.chmod(cache, 0o777)
    with pytest.raises(RuntimeError, match="writable by group or others"):
        kernels._build("elementwise")


def test_a_planted_library_is_refused(cache):
    lib = kernels._build("elementwise")  # the real one, built privately
    os.chmod(lib, 0o777)
    with pytest.raises(RuntimeError, match="writable by group or others"):
        kernels._build("elementwise")
    os.chmod(lib, 0o700)
    if os.getuid() == 0:  # only root can give a file away
        os.chown(lib, 65534, 65534)
        with pytest.raises(RuntimeError, match="not owned by this user"):
            kernels._build("elementwise")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
