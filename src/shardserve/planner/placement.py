"""Placement: which devices each deployment runs on, within every device's budget.

Pure: device budgets and deployment needs in, a plan out. First fit, largest deployments
first; each deployment takes the ``tp x pp`` devices with the most memory left, so deployments
spread before they stack, and several small ones share a device when memory allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.planner.memory import format_bytes


@dataclass(frozen=True)
class Need:
    name: str
    tp: int
    bytes_per_device: int  # on each of its devices (the largest pipeline stage's need)
    pp: int = 1
    # what those bytes hold, summing to them: ("weights", n), ("kv_cache", n),
    # ("activations", n) (the device map shows them)
    parts: tuple[tuple[str, int], ...] = ()

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp


@dataclass
class Plan:
    budgets: dict[str, int]  # device name -> budget
    assigned: dict[str, list[str]] = field(default_factory=dict)  # deployment -> devices
    needs: dict[str, Need] = field(default_factory=dict)

    def used(self, device: str) -> int:
        return sum(n.bytes_per_device for name, n in self.needs.items()
                   if device in self.assigned[name])

    def free(self, device: str) -> int:
        return self.budgets[device] - self.used(device)


def place(budgets: dict[str, int], needs: list[Need], plan: Plan | None = None) -> Plan:
    """Add ``needs`` to ``plan`` (or a new one); ``ValueError`` naming the first that does not
    fit and what would make it fit. The plan is unchanged when it raises."""
    plan = plan or Plan(dict(budgets))
    trial = Plan(plan.budgets, dict(plan.assigned), dict(plan.needs))
    for need in sorted(needs, key=lambda n: -n.num_devices * n.bytes_per_device):
        if need.name in trial.assigned:
            raise ValueError(f"deployment {need.name!r} is already placed")
        if need.num_devices > len(trial.budgets):
            raise ValueError(f"{need.name!r} needs {need.num_devices} devices; there are "
                             f"{len(trial.budgets)}")
        by_free = sorted(trial.budgets, key=lambda d: -trial.free(d))
        chosen = by_free[:need.num_devices]
        short = [d for d in chosen if trial.free(d) < need.bytes_per_device]
        if short:
            raise ValueError(
                f"{need.name!r} needs {format_bytes(need.bytes_per_device)} on each of "
                f"{need.num_devices} devices; the {need.num_devices} freest have "
                f"{', '.join(f'{d}: {format_bytes(trial.free(d))}' for d in chosen)} free; "
                "unload a model, lower its max_num_seqs / max_model_len, or add devices")
        trial.assigned[need.name] = chosen
        trial.needs[need.name] = need
    plan.assigned, plan.needs = trial.assigned, trial.needs
    return plan


def release(plan: Plan, name: str) -> None:
    plan.assigned.pop(name, None)
    plan.needs.pop(name, None)
