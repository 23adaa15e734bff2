"""Hardware profiles: devices per node, memory per device, compute and bandwidths, each with
the source its numbers came from, read from the YAML files shipped in
``shardserve/data/hardware/`` and from the ``local`` profile ``shardserve calibrate`` wrote
(``~/.cache/shardserve/hardware/local.yaml``). Pure data: nothing here measures anything.
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
    tflops_by_rows: dict[str, dict[int, float]] = field(default_factory=dict)  # measured


def local_profile_path() -> Path:
    """Where ``shardserve calibrate`` writes this machine's profile."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardserve" / \
        "hardware" / "local.yaml"


def profiles() -> dict[str, Hardware]:
    """Every shipped profile, by name."""
    import yaml

    out = {}
    local = local_profile_path()
    for path in sorted(_DATA.glob("*.yaml")) + ([local] if local.is_file() else []):
        for name, p in (yaml.safe_load(path.read_text()).get("profiles") or {}).items():
            out[name] = Hardware(
                name=name, device=str(p["device"]), kind=str(p["kind"]),
                devices_per_node=int(p["devices_per_node"]),
                memory_per_device=parse_bytes(str(p["memory_per_device"])),
                tflops={k: float(v) for k, v in (p.get("tflops") or {}).items()},
                memory_bandwidth_gib_s=p.get("memory_bandwidth_gib_s"),
                link_bandwidth_gib_s=p.get("link_bandwidth_gib_s"), source=str(p["source"]),
                tflops_by_rows={d: {int(r): float(v) for r, v in c.items()}
                                for d, c in (p.get("tflops_by_rows") or {}).items()})
    return out


def profile(name: str) -> Hardware:
    known = profiles()
    if name not in known:
        hint = "; run `shardserve calibrate` to measure this machine" if name == "local" else ""
        raise ValueError(f"no hardware profile {name!r}; known: {', '.join(sorted(known))}"
                         f"{hint}")
    return known[name]
