"""Hardware profiles: devices per node, memory per device, compute and bandwidths, each with
the source its numbers came from, read from the YAML files shipped in
``shardserve/data/hardware/`` and from the ``local`` profile ``shardserve calibrate`` wrote
(``~/.cache/shardserve/hardware/local.yaml``). Pure data: nothing here measures anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shardserve.planner.cost import Rates
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
    collective_latency_us: float | None = None  # a small all-reduce inside a node
    network_gib_s: float | None = None  # per node, between nodes
    # measured by ``shardserve calibrate``: for cpu:N, the rates of one of its N devices
    cpu_splits: dict[int, dict] = field(default_factory=dict)

    def rates(self, devices: int = 1) -> Rates:
        """What one device does when ``devices`` of this node are in use: the measured split
        of the node into at least that many devices (local), else the vendor's figures."""
        if self.cpu_splits:
            fit = [n for n in sorted(self.cpu_splits) if n >= devices]
            s = self.cpu_splits[fit[0] if fit else max(self.cpu_splits)]
            return Rates(linear_ps=s["linear_ps_per_weight"], all_reduce=s.get("all_reduce"),
                         overhead=s.get("overhead"), tflops=self.tflops,
                         memory_gib_s=self.memory_bandwidth_gib_s)
        return Rates(tflops=self.tflops, memory_gib_s=self.memory_bandwidth_gib_s,
                     link_gib_s=self.link_bandwidth_gib_s,
                     link_latency_us=self.collective_latency_us or 0.0,
                     network_gib_s=self.network_gib_s)


def local_profile_path() -> Path:
    """Where ``shardserve calibrate`` writes this machine's profile."""
    import os

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardserve" / \
        "hardware" / "local.yaml"


def read_profiles(path: Path) -> dict[str, Hardware]:
    """The profiles of one YAML file (shipped, or written by ``shardserve calibrate``)."""
    import yaml

    out = {}
    for name, p in (yaml.safe_load(Path(path).read_text()).get("profiles") or {}).items():
        splits = {int(n): {**v, "linear_ps_per_weight": {
            f: {int(r): float(ps) for r, ps in c.items()}
            for f, c in (v.get("linear_ps_per_weight") or {}).items()}}
            for n, v in (p.get("cpu_splits") or {}).items()}
        out[name] = Hardware(
            name=name, device=str(p["device"]), kind=str(p["kind"]),
            devices_per_node=int(p["devices_per_node"]),
            memory_per_device=parse_bytes(str(p["memory_per_device"])),
            tflops={k: float(v) for k, v in (p.get("tflops") or {}).items()},
            memory_bandwidth_gib_s=p.get("memory_bandwidth_gib_s"),
            link_bandwidth_gib_s=p.get("link_bandwidth_gib_s"), source=str(p["source"]),
            collective_latency_us=p.get("collective_latency_us"),
            network_gib_s=p.get("network_gib_s"), cpu_splits=splits)
    return out


def profiles() -> dict[str, Hardware]:
    """Every shipped profile, and ``local`` if calibrated, by name."""
    out = {}
    local = local_profile_path()
    for path in sorted(_DATA.glob("*.yaml")) + ([local] if local.is_file() else []):
        out.update(read_profiles(path))
    return out


def local_rates(devices: int) -> Rates | None:
    """This machine's measured rates for ``cpu:devices``, if ``shardserve calibrate`` ran."""
    local = profiles().get("local")
    return local.rates(devices) if local and local.cpu_splits else None


def profile(name: str) -> Hardware:
    known = profiles()
    if name not in known:
        hint = "; run `shardserve calibrate` to measure this machine" if name == "local" else ""
        raise ValueError(f"no hardware profile {name!r}; known: {', '.join(sorted(known))}"
                         f"{hint}")
    return known[name]
