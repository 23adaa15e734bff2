"""The recommender engine: DLRM scores for batches of samples, its tables sharded over ``tp``
devices (``planner/recsys.py``).

A request is TorchRec's KeyedJaggedTensor layout: ``dense`` ``(N, dense_in_features)``,
``lengths`` ``(F, N)`` ids per feature and sample, ``values`` the ids feature by feature,
sample by sample within a feature. ``check_request`` refuses what the model cannot score,
naming the input and the feature; ``score_many`` (``score_checked`` once checked) merges
several requests into one call to the workers and splits the scores back (a sample's score
does not depend on its batch-mates: pooling is per sample, the MLPs per row).
"""

from __future__ import annotations

import numpy as np

from shardserve.config import DeviceConfig, ModelConfig
from shardserve.engine.validation import Request, check_request
from shardserve.planner.recsys import check_tables_fit
from shardserve.planner.specs import DLRMSpec
from shardserve.runtime.devices import Device, parse_devices
from shardserve.runtime.executor import Executor


class RecommenderEngine:
    def __init__(self, model: ModelConfig, tp: int, device: DeviceConfig | list[Device],
                 label: str = "", step_timeout_s: float = 300.0) -> None:
        if not isinstance(model.spec, DLRMSpec):
            raise ValueError(f"{model.path}: {model.spec.architecture} is not a recommendation "
                             "model (kind: recommender serves DLRM)")
        devices = parse_devices(device.devices, device.device_memory) \
            if isinstance(device, DeviceConfig) else device
        if tp > len(devices):
            raise ValueError(f"tables over tp={tp} devices; {len(devices)} are given")
        self.config, self.spec = model, model.spec
        self.plan = check_tables_fit(self.spec, tp, model.torch_dtype_name,
                                     devices[0].memory_budget, len(devices))
        self.executor = Executor(model, devices[:tp], label, step_timeout_s)

    def score(self, dense: np.ndarray, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``(N,)`` scores in [0, 1]."""
        return self.score_many([(dense, values, lengths)])[0]

    def score_many(self, requests: list[Request]) -> list[np.ndarray]:
        """Each request's scores, all of them in one call to the workers."""
        return self.score_checked([check_request(self.spec, *r) for r in requests])

    def score_checked(self, checked: list[Request]) -> list[np.ndarray]:
        """``score_many`` of requests ``check_request`` has passed (the server checks each
        before it queues; its batches come here)."""
        dense, values, lengths = checked[0] if len(checked) == 1 else self._merge(checked)
        scores = self.executor.driver_call("recommend", dense=dense, values=values,
                                           lengths=lengths)
        cuts = np.cumsum([len(c[0]) for c in checked])[:-1]
        return np.split(np.asarray(scores, np.float32), cuts)

    def _merge(self, checked: list[Request]) -> Request:
        """Several checked requests as one: samples one after another, and the ids feature by
        feature, each request's ids of that feature in order."""
        segments = [np.split(v, np.cumsum(ln.sum(1))[:-1]) for _, v, ln in checked]
        return (np.concatenate([c[0] for c in checked]),
                np.concatenate([seg[t] for t in range(self.spec.num_tables)
                                for seg in segments]),
                np.concatenate([c[2] for c in checked], axis=1))

    def check_health(self, timeout_s: float) -> None:
        self.executor.check_health(timeout_s)

    def shutdown(self, kill: bool = False) -> None:
        self.executor.stop(kill)

    def __enter__(self) -> RecommenderEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
