"""The link between pipeline stages, on two real gloo ranks: a send does not wait for the
receiver (the next micro-batch starts while this one travels), tensors arrive exactly, and a
stage that failed makes the next one raise instead of wait."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

RANK = """
import os, sys, time
import torch, torch.distributed as dist
from shardserve.runtime.group import PipeLink, StageFailed
rank, store_path, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["GLOO_SOCKET_IFNAME"] = "lo"
dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
x = torch.arange(2 * 5 * 8, dtype=torch.float32).view(2, 5, 8) / 7
if rank == 0:
    link = PipeLink(None, 1)
    link.send(tuple(x), x.numel(), x.dtype)  # the two parts a stage hands on
    link.send(None, x.numel(), x.dtype)  # this stage failed the next step
    print("receiver had started:", os.path.exists(marker))
    link.flush()
else:
    link = PipeLink(0, None)
    time.sleep(1.0)  # busy with an earlier micro-batch
    open(marker, "w").close()
    assert torch.equal(link.recv(tuple(x.shape), x.dtype), x)
    try:
        link.recv(tuple(x.shape), x.dtype)
    except StageFailed as e:
        print("raised:", e)
dist.barrier()
"""


def test_sends_do_not_wait_tensors_arrive_and_failures_propagate(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(tmp_path / "store"),
                               str(tmp_path / "receiving")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "receiver had started: False" in outs[0][0]  # both sends returned before it
    assert "raised: the previous pipeline stage failed this step" in outs[1][0]
