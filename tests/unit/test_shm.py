"""Shared-memory collectives, with ranks as threads over one mapped file."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from shardserve.runtime import shm
from shardserve.runtime.group import TorchGroup

pytestmark = pytest.mark.skipif(not shm.supported(), reason="needs x86 and /dev/shm")


@pytest.mark.parametrize("size", [2, 3, 4])
def test_all_reduce_and_all_gather_match_dense_over_many_rounds(size):
    path = shm.create(size, 4096)
    groups = [TorchGroup(None, r, size, shm.ShmExchange(path, r, size, 4096))
              for r in range(size)]
    os.unlink(path)  # mapped by every rank; the mapping outlives the name
    gen = torch.Generator().manual_seed(0)
    rounds = [[torch.randn(3, 7, generator=gen) for _ in range(size)] for _ in range(50)]

    def run(g):
        outs = []
        for xs in rounds:  # back-to-back collectives exercise the double buffering
            outs.append(g.all_reduce(xs[g.rank].clone()))
            outs.append(g.all_gather(xs[g.rank], dim=-1))
        return outs

    with ThreadPoolExecutor(size) as pool:
        results = list(pool.map(run, groups))
    for k, xs in enumerate(rounds):
        total = xs[0].clone()
        for x in xs[1:]:
            total += x
        for outs in results:
            assert torch.equal(outs[2 * k], results[0][2 * k])  # identical on every rank
            torch.testing.assert_close(outs[2 * k], total)
            assert torch.equal(outs[2 * k + 1], torch.cat(xs, dim=-1))
    for g in groups:
        g.shm.close()


def test_a_tensor_larger_than_a_slot_does_not_fit():
    path = shm.create(2, 64)
    ex = shm.ShmExchange(path, 0, 2, 64)
    os.unlink(path)
    assert ex.fits(torch.zeros(16)) and not ex.fits(torch.zeros(17))
    ex.close()
