"""The encoder engine: batches of token lists in, one vector (or logits) per input out.

Encoders are one forward pass per batch, with no cache: the engine checks the model fits,
starts the workers, and splits a request list into batches of at most ``max_batch_tokens``
padded tokens. Pooling follows the model folder's sentence-transformers files when present
(``1_Pooling/config.json``, a ``Normalize`` module), else mean pooling without normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shardserve.config import DeviceConfig, ModelConfig, ParallelConfig
from shardserve.engine.validation import check_inputs
from shardserve.runtime.devices import Device, devices_for
from shardserve.runtime.executor import Executor


def pooling_config(folder: str) -> tuple[str, bool]:
    """(pooling, normalize) as sentence-transformers would apply them to this folder."""
    pooling, normalize = "mean", False
    pool_file = Path(folder) / "1_Pooling" / "config.json"
    if pool_file.is_file() and json.loads(pool_file.read_text()).get("pooling_mode_cls_token"):
        pooling = "cls"
    modules = Path(folder) / "modules.json"
    if modules.is_file():
        normalize = any(m.get("type", "").endswith("Normalize")
                        for m in json.loads(modules.read_text()))
    return pooling, normalize


class EncoderEngine:
    def __init__(self, model: ModelConfig, parallel: ParallelConfig,
                 device: DeviceConfig | list[Device], max_batch_tokens: int = 16384,
                 max_batch_size: int = 32, label: str = "",
                 step_timeout_s: float = 300.0) -> None:
        devices, _, self.precision = devices_for(model, parallel, device)
        tp = parallel.tensor_parallel_size
        self.config, self.max_batch_tokens = model, max_batch_tokens
        self.max_batch_size = max_batch_size
        self.pooling, self.normalize = pooling_config(model.path)
        self.executor = Executor(model, devices[:tp], label, step_timeout_s,
                                 self.precision.compute)

    def encode(self, token_lists: list[list[int]], pooling: str | None = None,
               normalize: bool | None = None) -> np.ndarray:
        """(N, H) pooled vectors, or (N, num_labels) logits for a classifier.
        ``InvalidRequest`` for an empty input, an id outside the vocabulary or one longer
        than the model takes."""
        token_lists = check_inputs(token_lists, self.config.spec.vocab_size,
                                   self.config.context_len)
        pooling = pooling or self.pooling
        normalize = self.normalize if normalize is None else normalize
        if pooling == "none":  # padded hidden states: one batch, in order (for tests)
            return [self.executor.collective_rpc("encode", token_ids=token_lists,
                                                 pooling=pooling, normalize=normalize)[0]]
        # Batch inputs of similar length together (less padding), then restore the order.
        order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
        rows: list[np.ndarray] = []
        for batch in self._batches([token_lists[i] for i in order]):
            rows.extend(self.executor.collective_rpc("encode", token_ids=batch,
                                                     pooling=pooling, normalize=normalize)[0])
        out = np.empty((len(rows), len(rows[0])), dtype=np.float32)
        out[order] = np.stack(rows)
        return out

    def _batches(self, token_lists: list[list[int]]):
        """Sorted by length: cut when the padded size or the count would be too large."""
        batch: list[list[int]] = []
        for t in token_lists:
            full = len(batch) == self.max_batch_size
            if batch and (full or len(t) * (len(batch) + 1) > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(t)
        if batch:
            yield batch

    def check_health(self, timeout_s: float) -> None:
        self.executor.check_health(timeout_s)

    def shutdown(self, kill: bool = False) -> None:
        self.executor.stop(kill)
