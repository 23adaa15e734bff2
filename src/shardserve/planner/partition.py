"""Pipeline stages: which contiguous decoder layers each stage of a ``tp x pp`` group holds.

Pure arithmetic. The first stage also holds the token embedding, the last the final norm and
the LM head (its own copy of a tied embedding when it is not also the first stage). By
default the split evens out the work: a decode step reads every weight of a stage once, so a
layer weighs its parameters and the last stage also carries the head's (``head_layers``, in
layers; the embedding is a lookup and weighs nothing), and the split with the most even
stage weights wins (ties: the earlier stages take more). On a llama-110m shape (the head
weighs 3.9 layers) that is 8 + 4 layers for pp=2, where 6 + 6 left stage 0 idle a third of
the time (benchmarks/RESULTS.md). With ``head_layers=0`` it is the even split, the remainder
on the earlier stages. An explicit split (``"5,3"``) names the layers of each stage.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    index: int  # 0 .. count - 1
    count: int  # stages in the group (pp)
    start: int  # first decoder layer this stage holds
    stop: int  # one past its last

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    def holds_layer(self, layer: int) -> bool:
        return self.start <= layer < self.stop

    @property
    def name(self) -> str:
        return f"stage {self.index} (layers {self.start}-{self.stop - 1})"

    @staticmethod
    def whole(num_layers: int) -> Stage:
        """The only stage of a group without pipeline parallelism."""
        return Stage(0, 1, 0, num_layers)


def parse_split(text: str | list[int] | tuple[int, ...] | None) -> tuple[int, ...] | None:
    """``"5,3"`` or ``[5, 3]`` -> ``(5, 3)``; None stays None (the balanced split)."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        try:
            parts = tuple(int(p) for p in text.split(","))
        except ValueError:
            raise ValueError(f"pipeline split {text!r}: write the layers of each stage, "
                             "e.g. 5,3") from None
    else:
        parts = tuple(text)
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in parts):
        raise ValueError(f"pipeline split {text!r}: every stage needs at least one layer")
    return parts


def split_layers(num_layers: int, pp: int, split: tuple[int, ...] | None = None,
                 head_layers: float = 0.0) -> list[Stage]:
    """The ``pp`` stages of a model with ``num_layers`` decoder layers."""
    if pp < 1:
        raise ValueError(f"pipeline_parallel_size={pp} must be >= 1")
    if pp > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} exceeds the model's {num_layers} "
                         f"decoder layers; use pp <= {num_layers}")
    if split is not None:
        if len(split) != pp or sum(split) != num_layers:
            raise ValueError(f"pipeline split {','.join(map(str, split))} must name {pp} "
                             f"stages whose layers sum to the model's {num_layers}")
        sizes = list(split)
    else:
        sizes = _balanced(num_layers, pp, head_layers)
    stages, start = [], 0
    for i, n in enumerate(sizes):
        stages.append(Stage(i, pp, start, start + n))
        start += n
    return stages


def _balanced(num_layers: int, pp: int, head_layers: float) -> list[int]:
    """Layers per stage (each at least one) with the most even work, the last stage weighing
    ``head_layers`` more: the least sum of squared stage weights, which also keeps the
    heaviest stage light; ties go to the split whose earlier stages hold more layers."""
    def key(option):
        cost, sizes = option
        return cost, [-x for x in sizes]

    # best[n]: (sum of squares, sizes) for the first n layers over the stages so far
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for k in range(1, pp + 1):
        last = k == pp
        row = {}
        for n in ([num_layers] if last else range(k, num_layers - (pp - k) + 1)):
            extra = head_layers if last else 0.0
            options = [(c + (n - m + extra) ** 2, sizes + [n - m])
                       for m, (c, sizes) in best.items() if m < n]
            row[n] = min(options, key=key)
        best = row
    return best[num_layers][1]
