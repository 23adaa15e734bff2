"""A worker keeps the memory a step freed for the next step: large blocks are not unmapped
and mapped again (a page fault per 4 KiB touched) between steps."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from shardserve.runtime.worker import _keep_freed_memory
if sys.argv[1] == "keep":
    assert _keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # a step's activations: allocated, written, freed
    a = torch.empty((64 << 20) // 4).fill_(1.0)
    b = torch.empty((8 << 20) // 4).fill_(1.0)
    del a, b
step(); step()  # the first steps fault their working set in either way
before = faults()
for _ in range(8):
    step()
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 8 * (72 << 20) // 4096  # what the loop touches
    # glibc maps 64 MiB afresh each time: 131,080-135,177 faults seen
    assert _faults("default") > 3 * pages // 4
    # the heap keeps them: 0 to 32,768 faults seen here (a block of the first steps now
    # and then faulted in again), 49,153 once on a loaded machine (three blocks), against
    # nine tenths of them by default
    assert _faults("keep") < pages // 2
