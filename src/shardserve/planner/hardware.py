"""Hardware profiles: devices per node, memory per device, compute and bandwidths, each with
the source its numbers came from, read from the YAML files shipped in
``shardserve/data/hardware/``. Pure data: nothing here measures anything (issue 14's
``shardserve calibrate`` will write a ``local`` profile the same way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shardserve.planner.memory import parse_bytes

_DATA = Path(__file__).resolve().parent.parent / "data" / "hardware"


@dataclass(frozen=True)
class Hardware:
    name: str
    device: str  # the accelerator's name
    kind: str  # how devices are named: neuron:0, cuda:0
    devices_per_node: int
    memory_per_device: int  # bytes
    tflops: dict[str, float] = field(default_factory=dict)  # dense, per device, by dtype
    memory_bandwidth_gib_s: float | None = None  # per device
    link_bandwidth_gib_s: float | None = None  # device to device inside a node
    source: str = ""


def profiles() -> dict[str, Hardware]:
    """Every shipped profile, by name."""
    import yaml

    out = {}
    for path in sorted(_DATA.glob("*.yaml")):
        for name, p in (yaml.safe_load(path.read_text()).get("profiles") or {}).items():
            out[name] = Hardware(
                name=name, device=str(p["device"]), kind=str(p["kind"]),
                devices_per_node=int(p["devices_per_node"]),
                memory_per_device=parse_bytes(str(p["memory_per_device"])),
                tflops={k: float(v) for k, v in (p.get("tflops") or {}).items()},
                memory_bandwidth_gib_s=p.get("memory_bandwidth_gib_s"),
                link_bandwidth_gib_s=p.get("link_bandwidth_gib_s"), source=str(p["source"]))
    return out


def profile(name: str) -> Hardware:
    known = profiles()
    if name not in known:
        raise ValueError(f"no hardware profile {name!r}; known: {', '.join(sorted(known))}")
    return known[name]
