"""asyncio front of an encoder (or recommender) replica: a dynamic batcher over a supervised
engine that answers one forward pass per batch.

Batches run one at a time on a worker thread (``DynamicBatcher``). A batch whose group fails
(``WorkerError``) ends with ``EngineUnavailable`` for every request in it, and the supervisor
starts a new group; until it is ready, batches are refused the same way. A batch the workers
raised on is retried request by request by the batcher, so a bad request fails alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from shardserve.engine.batcher import DynamicBatcher
from shardserve.engine.encoder_engine import EncoderEngine
from shardserve.engine.errors import EngineUnavailable, RequestFailed
from shardserve.engine.supervisor import RestartPolicy, Status, Supervisor
from shardserve.runtime.executor import RemoteError, WorkerError


class AsyncEncoder:
    def __init__(self, factory: Callable[[], EncoderEngine], max_batch_size: int,
                 max_queue_delay_ms: float = 0.0, preferred_batch_sizes: Sequence[int] = (),
                 name: str = "encoder", policy: RestartPolicy | None = None,
                 method: str = "encode") -> None:
        """``method``: the engine's batch call (``encode``; a recommender's
        ``score_checked``)."""
        self.name, self.method = name, method
        self._sup = Supervisor(name, factory, policy or RestartPolicy())
        self._sup.start()
        self.batcher = DynamicBatcher(self._run_batch, max_batch_size, max_queue_delay_ms,
                                      preferred_batch_sizes)

    @property
    def status(self) -> Status:
        return self._sup.status

    async def submit(self, item: object, size: int = 1) -> object:
        """One input's answer (an encoder's token ids -> pooled vector or logits; a
        recommender's samples -> scores), batched with whatever else is queued; ``size``
        its length, for the batcher's grouping."""
        return await self.batcher.submit(item, size=size)

    def _run_batch(self, items: list[list[int]]) -> np.ndarray:
        engine = self._sup.engine
        if engine is None:
            status = self._sup.status
            why = f" ({status.reason})" if status.reason else ""
            raise EngineUnavailable(f"model `{self.name}` is {status.state.value.lower()}"
                                    f"{why}; retry later")
        try:
            return getattr(engine, self.method)(items)
        except RemoteError as e:  # the group is fine; the batcher retries request by request
            raise RequestFailed(str(e)) from None
        except WorkerError as e:
            self._sup.fail(engine, e)
            raise EngineUnavailable(f"model `{self.name}` lost its workers ({e}); it is "
                                    "restarting, retry later") from None

    def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        """Finish (or, past the deadline, fail) what is queued, then stop the workers."""
        self.batcher.close(drain_timeout_s)
        self._sup.close()
