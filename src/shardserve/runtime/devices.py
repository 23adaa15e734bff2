"""Device slots: ``cpu:N`` (worker processes with a share of the cores each) or ``cuda``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardserve.config import DeviceConfig, ModelConfig, ParallelConfig
from shardserve.planner.memory import parse_bytes

if TYPE_CHECKING:
    from shardserve.runtime.precision import Precision


@dataclass(frozen=True)
class Device:
    """One accelerator slot that one worker process drives."""

    kind: str  # "cpu" or "cuda"
    index: int
    cores: tuple[int, ...]  # CPU cores the worker is pinned to
    memory_budget: int  # bytes for weights + KV cache + activations

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.index}"

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def parse_devices(text: str, device_memory: str | int | None = None) -> list[Device]:
    """``"cpu:4"`` -> four CPU devices splitting this process's cores; ``"cuda"`` -> every GPU."""
    kind, _, count = text.partition(":")
    if kind == "cpu":
        try:
            n = int(count or 1)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--devices {text!r}: write cpu:N with N >= 1, e.g. cpu:2")
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = parse_bytes(device_memory) if device_memory is not None else host // n
        return [Device("cpu", i, c, budget) for i, c in enumerate(split_cores(n))]
    if kind == "cuda":
        return _cuda_devices(count, device_memory)
    raise ValueError(f"--devices {text!r}: expected cpu:N or cuda")


def devices_for(model: ModelConfig, parallel: ParallelConfig,
                device: DeviceConfig | list[Device], precision: Precision | None = None
                ) -> tuple[list[Device], int, Precision]:
    """Check, before any worker starts, that ``model`` is served and splits at this tp, and
    that its shard fits the devices (a ``DeviceConfig`` to parse, or devices the host placed
    it on). Returns every device, the weight bytes per device and the precision it runs in
    (``precision`` if the caller chose it already: an engine core, whose host did)."""
    from shardserve.models.registry import check_architecture
    from shardserve.planner.memory import check_fits, check_stages_fit
    from shardserve.runtime.precision import choose

    spec = model.spec
    check_architecture(spec.architecture)
    parallel.check_model(spec)
    tp, world = parallel.tensor_parallel_size, parallel.world_size
    if isinstance(device, DeviceConfig):
        devices = parse_devices(device.devices, device.device_memory)
    else:
        devices = device
    if world > len(devices):
        what = f"tensor_parallel_size={tp}" if world == tp else \
            f"tensor_parallel_size={tp} x pipeline_parallel_size={parallel.pipeline_parallel_size}"
        raise ValueError(f"{what} needs {world} devices; "
                         f"{', '.join(d.name for d in devices)} are {len(devices)}")
    precision = precision or choose(model, devices[0].kind)
    budget = devices[0].memory_budget
    if parallel.pipeline_parallel_size > 1:
        weights = max(check_stages_fit(spec, tp, parallel.stages(spec), precision.weights,
                                       budget, precision.compute, precision.quantization))
    else:
        weights = check_fits(spec, tp, precision.weights, budget, len(devices),
                             precision.compute, precision.quantization)
    return devices, weights, precision


def split_cores(n: int) -> list[tuple[int, ...]]:
    """Share this process's cores among ``n`` workers: disjoint when there are enough, else
    round-robin (4 workers on 2 cores share them two by two)."""
    cores = sorted(os.sched_getaffinity(0))
    if n <= len(cores):
        per = len(cores) // n
        return [tuple(cores[i * per:(i + 1) * per]) for i in range(n)]
    return [(cores[i % len(cores)],) for i in range(n)]


def _cuda_devices(count: str, device_memory: str | int | None) -> list[Device]:
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--devices cuda: no CUDA device is visible; use cpu:N")
    n = torch.cuda.device_count() if not count else int(count)
    cores = split_cores(n)
    out = []
    for i in range(n):
        total = torch.cuda.get_device_properties(i).total_memory
        budget = parse_bytes(device_memory) if device_memory is not None else total
        out.append(Device("cuda", i, cores[i], min(budget, total)))
    return out
