"""One rank of a recommendation model: its table shards and the dense MLPs, loaded within its
budget, answering ``recommend`` calls (rank 0 returns the scores)."""

from __future__ import annotations

import numpy as np
import torch

from shardserve.config import ModelConfig
from shardserve.models.dlrm import DLRM
from shardserve.models.loader import LoadStats, load_weights
from shardserve.planner.recsys import check_tables_fit
from shardserve.runtime.group import Group
from shardserve.runtime.model_runner import _allocated, _default_dtype, _nbytes, check_loaded


class RecRunner:
    def __init__(self, config: ModelConfig, group: Group, device: torch.device,
                 budget: int) -> None:
        self.config, self.group, self.device, self.budget = config, group, device, budget
        dtype_name = config.torch_dtype_name
        self.dtype = getattr(torch, dtype_name)
        plan = check_tables_fit(config.spec, group.size, dtype_name, budget)
        before = _allocated(device)
        with _default_dtype(self.dtype), device:
            self.model = DLRM(config.spec, 1, group, plan)
        self.load_stats: LoadStats = load_weights(self.model, config.path, self.dtype)
        self.weight_bytes = _nbytes(self.model)
        check_loaded(self, before)
        self.tables = {int(k): (t.shard.start, t.shard.stop)
                       for k, t in self.model.tables.items()}

    @torch.inference_mode()
    def recommend(self, dense: np.ndarray, values: np.ndarray,
                  lengths: np.ndarray) -> np.ndarray | None:
        """Scores ``(B,)`` on rank 0 for checked inputs (``engine/recommender.py``)."""
        # copies: arrays decoded from a message are read-only views of its bytes
        out = self.model(torch.from_numpy(np.array(dense, np.float32)),
                         torch.from_numpy(np.array(values, np.int64)),
                         torch.from_numpy(np.array(lengths, np.int64)))
        return None if out is None else out.numpy()

    def ping(self) -> int:
        return self.group.rank

    def stats(self) -> dict:
        return {"rank": self.group.rank, "weight_bytes": self.weight_bytes,
                "loaded_bytes": self.loaded_bytes, "budget": self.budget, "cache_bytes": 0,
                "bytes_read": self.load_stats.bytes_read,
                "largest_read": self.load_stats.largest_read,
                "tables": {str(t): list(r) for t, r in self.tables.items()},
                "comm_seconds": self.group.comm_seconds}
