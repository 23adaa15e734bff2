"""Prometheus metrics, named after vLLM's with a ``shardserve:`` prefix and labelled by model.

Latencies are observed by the request paths (``observe``); gauges of running and waiting
requests, KV-cache use, readiness and restarts are read from the host when scraped (from what
each engine loop last published: nothing here touches an engine). Each app has its own
registry, so several servers can live in one process (tests do). ``render`` can keep only the
series of the models a caller may see (a tenant's key sees its own models' series only).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, host) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram("shardserve:time_to_first_token_seconds",
                              "Time to first token.", m, buckets=_LATENCY, registry=r)
        self.itl = Histogram("shardserve:inter_token_latency_seconds",
                             "Time between output tokens.", m, buckets=_LATENCY, registry=r)
        self.e2e = Histogram("shardserve:e2e_request_latency_seconds",
                             "Request latency, arrival to last token.", m, buckets=_LATENCY,
                             registry=r)
        self.prompt_tokens = Counter("shardserve:prompt_tokens", "Prompt tokens.", m,
                                     registry=r)
        self.generation_tokens = Counter("shardserve:generation_tokens", "Generated tokens.",
                                         m, registry=r)
        self.requests = Counter("shardserve:request_success", "Finished requests.",
                                m + ["finished_reason"], registry=r)
        self.replica_requests = Counter("shardserve:replica_requests", "Requests admitted, by "
                                        "replica.", m + ["replica"], registry=r)
        r.register(_HostCollector(host))
        self.recent = Recent()

    def render(self, visible: Callable[[str], bool] | None = None) -> bytes:
        """The exposition text; with ``visible``, only series of models it accepts."""
        if visible is None:
            return generate_latest(self.registry)
        return generate_latest(_Only(self.registry, visible))


class _Only:
    """A registry view holding only samples labelled with a visible model_name."""

    def __init__(self, registry: CollectorRegistry, visible: Callable[[str], bool]) -> None:
        self.registry, self.visible = registry, visible

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if "model_name" in s.labels
                              and self.visible(s.labels["model_name"])]
            if family.samples:
                yield family


@dataclass
class RequestTimer:
    """Follows one request's deltas as they arrive from the engine (however its outputs are
    delivered) and records its latencies."""

    metrics: Metrics
    model: str
    prompt_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    def observe(self, at: float, delta) -> None:
        """``delta`` (a ``RequestDelta``) arrived at ``at`` (``time.perf_counter``)."""
        new = sum(len(s.token_ids) for s in delta.seqs)
        recent = self.metrics.recent
        if new > 0:
            if self.last is None:
                self.metrics.ttft.labels(self.model).observe(at - self.start)
                recent.add("ttft", self.model, at - self.start)
                self.first = at
            else:
                for _ in range(new):
                    self.metrics.itl.labels(self.model).observe((at - self.last) / new)
            self.last, self.tokens = at, self.tokens + new
            recent.add("tokens", self.model, new)
        if delta.finished and self.tokens > 1 and self.first is not None:
            recent.add("tpot", self.model, (self.last - self.first) / (self.tokens - 1))
        m = self.metrics
        for s in delta.seqs:
            if s.finish_reason is not None:
                m.requests.labels(self.model, s.finish_reason).inc()
        if delta.finished:
            m.e2e.labels(self.model).observe(at - self.start)
            m.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
            m.generation_tokens.labels(self.model).inc(self.tokens)


class Recent:
    """Each model's last ``window_s`` seconds of requests, for the device map's live figures:
    time to first token and time per output token (TPOT: a request's time from its first to
    its last token over its other tokens, as vLLM's benchmarks count it) as p50/p99, and
    generated tokens per second. Fed by ``RequestTimer`` on the event loop; read there."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self.window_s, self.clock = window_s, clock
        self._samples: dict[tuple[str, str], deque[tuple[float, float]]] = {}

    def add(self, what: str, model: str, value: float) -> None:
        q = self._samples.setdefault((what, model), deque())
        q.append((self.clock(), value))
        self._prune(q)  # kept to the window whether or not anyone reads it

    def _prune(self, q: deque) -> None:
        cut = self.clock() - self.window_s
        while q and q[0][0] < cut:
            q.popleft()

    def _values(self, what: str, model: str) -> list[float]:
        q = self._samples.get((what, model))
        if q is None:
            return []
        self._prune(q)
        return [v for _, v in q]

    def summary(self, model: str) -> dict:
        """``ttft_ms`` and ``tpot_ms`` (``p50``, ``p99``; None without requests) and
        ``tokens_per_s`` over the window."""
        out: dict = {}
        for what in ("ttft", "tpot"):
            values = sorted(self._values(what, model))
            out[f"{what}_ms"] = {f"p{q}": (1e3 * _quantile(values, q / 100) if values else None)
                                 for q in (50, 99)} | {"requests": len(values)}
        out["tokens_per_s"] = sum(self._values("tokens", model)) / self.window_s
        return out


def _quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values``, interpolated between neighbours."""
    at = q * (len(values) - 1)
    lo = int(at)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (at - lo)


class _HostCollector:
    def __init__(self, host) -> None:
        self.host = host

    def collect(self):
        running = GaugeMetricFamily("shardserve:num_requests_running",
                                    "Sequences running.", labels=["model_name"])
        waiting = GaugeMetricFamily("shardserve:num_requests_waiting",
                                    "Sequences waiting.", labels=["model_name"])
        kv = GaugeMetricFamily("shardserve:kv_cache_usage_perc",
                               "Fraction of KV-cache blocks in use.", labels=["model_name"])
        batches = CounterMetricFamily("shardserve:encoder_batches",
                                      "Forward passes the dynamic batcher ran.",
                                      labels=["model_name"])
        batched = CounterMetricFamily("shardserve:encoder_batched_requests",
                                      "Inputs those passes carried.", labels=["model_name"])
        ready = GaugeMetricFamily("shardserve:model_ready",
                                  "1 while any replica can serve, else 0.",
                                  labels=["model_name"])
        restarts = CounterMetricFamily("shardserve:replica_restarts",
                                       "Worker groups started again after a failure.",
                                       labels=["model_name"])
        admitted = GaugeMetricFamily("shardserve:num_requests_admitted",
                                     "HTTP requests admitted and not yet answered.",
                                     labels=["model_name"])
        info = GaugeMetricFamily("shardserve:model_info", "The kernel path and dtypes a "
                                 "model runs with (value 1).",
                                 labels=["model_name", "kernels", "dtype", "compute_dtype",
                                         "kv_cache_dtype"])
        for name, dep in list(self.host.deployments.items()):
            p = dep.precision
            info.add_metric([name, p.label, p.weights, p.compute, p.kv], 1.0)
            ready.add_metric([name], float(dep.ready))
            admitted.add_metric([name], dep.inflight)
            restarts.add_metric([name], sum(r.engine.status.restarts for r in dep.replicas))
            load = dep.load()
            if "batches" in load:  # dynamic batching
                batches.add_metric([name], load["batches"])
                batched.add_metric([name], load["batched"])
                continue
            running.add_metric([name], load["running"])
            waiting.add_metric([name], load["waiting"])
            kv.add_metric([name], load["kv_cache_usage"])
        mem = GaugeMetricFamily("shardserve:device_memory_used_bytes",
                                "Bytes planned on each device.", labels=["device"])
        budget = GaugeMetricFamily("shardserve:device_memory_budget_bytes",
                                   "Each device's memory budget.", labels=["device"])
        for row in self.host.device_usage():
            mem.add_metric([row["device"]], row["used"])
            budget.add_metric([row["device"]], row["budget"])
        yield from (running, waiting, kv, ready, restarts, admitted, info, mem, budget,
                    batches, batched)
