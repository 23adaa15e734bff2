"""Pipeline stages: which contiguous parts of the decoder layers each stage of a ``tp x pp``
group holds.

Pure arithmetic. A stage boundary may fall between two layers or inside one, between its
attention block (input norm, attention) and its MLP block (post-attention norm, MLP): the
hidden state and residual that cross a boundary are the same at both places. A stage is a
range of half layers, ``2i`` being layer ``i``'s attention block and ``2i + 1`` its MLP
block, so ``7.5`` layers are layers 0-6 and layer 7's attention. The first stage also holds
the token embedding, the last the final norm and the LM head (its own copy of a tied
embedding when it is not also the first stage).

By default the split evens out the work of a decode step, which reads every weight of a
stage once and, in its attention blocks, the KV cache of its micro-batch: an attention
block weighs its parameters plus the cache elements it reads (``kv_tokens`` positions a
step, the caller's estimate), an MLP block its parameters, the last stage's head its own
(the embedding is a lookup and weighs nothing). The split whose heaviest stage is lightest
wins (then the most even, then the one whose earlier stages hold more). On a llama-110m
shape at 32 sequences of 80 tokens a micro-batch that is 7.5 + 4.5 layers for pp=2: by
parameters alone (8 + 4) stage 0 was the slower by a tenth (benchmarks/RESULTS.md). An
explicit split (``"5,3"``, ``"7.5,4.5"``) names the layers of each stage, in halves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    index: int  # 0 .. count - 1
    count: int  # stages in the group (pp)
    start: int  # first half layer this stage holds (2i: layer i's attention, 2i + 1: MLP)
    stop: int  # one past its last

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    @property
    def layers(self) -> range:
        """The decoder layers this stage holds a part of (all of, but at its ends)."""
        return range(self.start // 2, (self.stop + 1) // 2)

    def holds_attention(self, layer: int) -> bool:
        return self.start <= 2 * layer < self.stop

    def holds_mlp(self, layer: int) -> bool:
        return self.start <= 2 * layer + 1 < self.stop

    @property
    def num_attention(self) -> int:
        """Attention blocks here (each with its layer's KV cache)."""
        return sum(map(self.holds_attention, self.layers))

    @property
    def num_mlp(self) -> int:
        return sum(map(self.holds_mlp, self.layers))

    @property
    def size(self) -> int | float:
        """Its layers as a split names them: 4, or 7.5."""
        return _layers(self.stop - self.start)

    @property
    def holds(self) -> str:
        """``layers 8-11``; with half a layer at an end, ``layers 0-6, layer 7's attention``."""
        first, last = self.layers[0], self.layers[-1]
        head = [f"layer {first}'s MLP"] if not self.holds_attention(first) else []
        tail = [f"layer {last}'s attention"] if not self.holds_mlp(last) else []
        a, b = first + len(head), last - len(tail)
        whole = [] if a > b else [f"layer {a}"] if a == b else [f"layers {a}-{b}"]
        return ", ".join(head + whole + tail)

    @property
    def name(self) -> str:
        return f"stage {self.index} ({self.holds})"

    @staticmethod
    def whole(num_layers: int) -> Stage:
        """The only stage of a group without pipeline parallelism."""
        return Stage(0, 1, 0, 2 * num_layers)


def _layers(halves: int) -> int | float:
    return halves // 2 if halves % 2 == 0 else halves / 2


def parse_split(text: str | list | tuple | None) -> tuple[int | float, ...] | None:
    """``"5,3"``, ``"7.5,4.5"`` or ``[5, 3]`` -> the layers of each stage; None stays None
    (the balanced split)."""
    if text is None or text == "":
        return None
    hint = "write the layers of each stage, e.g. 5,3 or 7.5,4.5 (halves split a layer " \
        "between its attention and its MLP)"
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        halves = [2 * float(p) for p in parts if not isinstance(p, bool)]
    except (TypeError, ValueError):
        raise ValueError(f"pipeline split {text!r}: {hint}") from None
    if len(halves) != len(parts) or not all(h == int(h) and h >= 1 for h in halves):
        raise ValueError(f"pipeline split {text!r}: {hint}; every stage needs at least half "
                         "a layer")
    return tuple(_layers(int(h)) for h in halves)


@dataclass(frozen=True)
class BlockWeights:
    """What the balanced split weighs: an attention block, an MLP block, the LM head."""
    attention: float = 1.0
    mlp: float = 1.0
    head: float = 0.0


def split_layers(num_layers: int, pp: int, split: tuple[int | float, ...] | None = None,
                 weights: BlockWeights = BlockWeights()) -> list[Stage]:
    """The ``pp`` stages of a model with ``num_layers`` decoder layers."""
    if pp < 1:
        raise ValueError(f"pipeline_parallel_size={pp} must be >= 1")
    if pp > 2 * num_layers:
        raise ValueError(f"pipeline_parallel_size={pp} exceeds the model's {num_layers} "
                         f"decoder layers (two blocks each); use pp <= {2 * num_layers}")
    if split is not None:
        sizes = [round(2 * s) for s in split]
        if len(sizes) != pp or sum(sizes) != 2 * num_layers:
            raise ValueError(f"pipeline split {','.join(map(str, split))} must name {pp} "
                             f"stages whose layers sum to the model's {num_layers}")
    else:
        sizes = _balanced(num_layers, pp, weights)
    stages, start = [], 0
    for i, n in enumerate(sizes):
        stages.append(Stage(i, pp, start, start + n))
        start += n
    return stages


def _balanced(num_layers: int, pp: int, w: BlockWeights) -> list[int]:
    """Half layers per stage (each at least one): the least heaviest stage, then the least
    sum of squared stage weights, then the split whose earlier stages hold more."""
    n = 2 * num_layers
    prefix = [0.0]
    for b in range(n):
        prefix.append(prefix[-1] + (w.attention if b % 2 == 0 else w.mlp))

    def key(option):
        heaviest, squares, sizes = option
        return round(heaviest, 9), round(squares, 9), [-x for x in sizes]

    # best[m]: (heaviest, sum of squares, sizes) for the first m blocks over the stages so far
    best: dict[int, tuple[float, float, list[int]]] = {0: (0.0, 0.0, [])}
    for k in range(1, pp + 1):
        last = k == pp
        row = {}
        for m in ([n] if last else range(k, n - (pp - k) + 1)):
            extra = w.head if last else 0.0
            options = []
            for j, (heavy, squares, sizes) in best.items():
                if j < m:
                    cost = prefix[m] - prefix[j] + extra
                    options.append((max(heavy, cost), squares + cost * cost, sizes + [m - j]))
            row[m] = min(options, key=key)
        best = row
    return best[n][2]
