"""ModelHost: the deployments of one server, by name, placed on devices by a memory plan and
loaded and unloaded live (Triton's explicit model control).

A load either places and starts every replica or changes nothing (no planned bytes, no
worker left). Each replica's engine is supervised (``engine/supervisor.py``): a failed group
is restarted on the same devices, so a deployment keeps its place in the plan through
restarts. A model is ready while any replica is; ``pick`` sends requests to ready replicas
only. An unload takes the model out of the table first (new requests: 404), then drains.

A deployment on the Ray executor runs on the Ray cluster's nodes, not on this host's
devices: it takes no place in the host's plan; Ray's placement groups place its ranks, each
with the bytes per device the plan computed as its budget, and a restart waits for the
cluster to have room again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass

from shardserve.config import (
    DeploymentConfig,
    ModelConfig,
)
from shardserve.engine.async_encoder import AsyncEncoder
from shardserve.engine.async_engine import AsyncLLMEngine
from shardserve.engine.encoder_engine import EncoderEngine
from shardserve.engine.errors import EngineUnavailable
from shardserve.engine.pipeline import Pipeline, PipelineConfig
from shardserve.engine.recommender import RecommenderEngine
from shardserve.engine.speech import SpeechInput
from shardserve.engine.supervisor import RestartPolicy, State
from shardserve.engine.tokenizer import load_chat_template, load_tokenizer
from shardserve.models.registry import check_architecture
from shardserve.planner.memory import cross_bytes_per_seq, stage_bytes, weight_bytes_per_device
from shardserve.planner.placement import Need, Plan, place, release
from shardserve.planner.recsys import plan_tables
from shardserve.planner.specs import WhisperSpec
from shardserve.runtime.devices import Device
from shardserve.runtime.precision import Precision, choose

log = logging.getLogger(__name__)


@dataclass
class Replica:
    engine: AsyncLLMEngine | AsyncEncoder  # both: name, status, shutdown(drain_timeout_s)
    devices: list[str]
    inflight: int = 0  # admitted HTTP requests not yet answered (the API layer counts)

    @property
    def ready(self) -> bool:
        return self.engine.status.state is State.READY

    def shutdown(self, drain_timeout_s: float) -> None:
        self.engine.shutdown(drain_timeout_s)


@dataclass
class Deployment:
    config: DeploymentConfig
    model: ModelConfig
    replicas: list[Replica]
    tokenizer: object | None
    chat_template: str | None
    bytes_per_device: int
    precision: Precision
    speech: SpeechInput | None = None  # a speech model's audio front end

    @property
    def is_encoder(self) -> bool:
        return self.model.is_encoder

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas)

    def replica_rows(self) -> list[dict]:
        return [{"devices": r.devices, "state": r.engine.status.state.value,
                 "reason": r.engine.status.reason, "restarts": r.engine.status.restarts}
                for r in self.replicas]

    def load(self) -> dict:
        """Its replicas' load, as each engine last published it: with dynamic batching,
        inputs waiting, batches run and inputs they carried; else sequences running and
        waiting, and KV-cache use (the replicas' mean)."""
        engines = [r.engine for r in self.replicas]
        if self.kind in ("encoder", "recommender"):
            return {"running": 0, "waiting": sum(len(e.batcher.queue) for e in engines),
                    "batches": sum(e.batcher.batches for e in engines),
                    "batched": sum(e.batcher.items for e in engines)}
        loads = [e.load for e in engines]
        return {"running": sum(x.running for x in loads),
                "waiting": sum(x.waiting for x in loads),
                "kv_cache_usage": sum(x.kv_usage for x in loads) / len(loads)}

    @property
    def ready(self) -> bool:
        return any(r.ready for r in self.replicas)

    @property
    def state(self) -> State:
        """READY while any replica is; else RESTARTING while any restarts; else FAILED."""
        states = {r.engine.status.state for r in self.replicas}
        for state in (State.READY, State.RESTARTING, State.UNLOADING):
            if state in states:
                return state
        return State.FAILED

    def pick(self) -> Replica:
        """The ready replica with the fewest requests in flight; ``EngineUnavailable`` (with
        the reason) when none is ready."""
        ready = [r for r in self.replicas if r.ready]
        if not ready:
            status = self.replicas[0].engine.status
            why = f" ({status.reason})" if status.reason else ""
            raise EngineUnavailable(f"model `{self.config.name}` is "
                                    f"{self.state.value.lower()}{why}; retry later")
        return min(ready, key=lambda r: r.inflight)


def deployment_need(cfg: DeploymentConfig, model: ModelConfig, precision: Precision) -> Need:
    """Bytes per device: weights (in their dtype), one step's activations, and a KV cache that
    holds ``max_num_seqs`` sequences of full length (activations in the compute dtype, the
    cache in its own; encoders: weights and a batch's activations). With pipeline stages,
    the largest stage's need (every device of a replica gets the same budget)."""
    spec, dtype = model.spec, precision.compute
    check_architecture(spec.architecture)
    parallel = cfg.parallel_config()
    parallel.check_model(spec)
    if model.kind != cfg.kind:
        raise ValueError(f"{cfg.name}: model.yaml says kind {cfg.kind!r} but "
                         f"{spec.architecture} is served as kind {model.kind!r}; set kind: "
                         f"{model.kind}")
    if model.kind == "recommender":  # its shards and one batch's pooled rows
        tables = max(plan_tables(spec, cfg.tp, precision.weights).bytes_per_device())
        batch = cfg.max_batch_size * 64  # samples a batch may carry, generously
        act = batch * (spec.num_tables + 1) * (spec.embedding_dim + spec.num_tables) * 4 * 2
        return Need(cfg.name, cfg.tp, tables + act,
                    parts=(("weights", tables), ("activations", act)))
    if model.is_encoder:
        weights = weight_bytes_per_device(spec, cfg.tp, precision.weights, precision.compute,
                                          precision.quantization)
        per_token = (4 * spec.hidden_size + 2 * spec.intermediate_size // cfg.tp) * 4
        act = cfg.max_batch_size * model.context_len * per_token
        return Need(cfg.name, cfg.tp, weights + act,
                    parts=(("weights", weights), ("activations", act)))
    block = cfg.block_size
    tokens = cfg.max_num_seqs * -(-model.context_len // block) * block
    stages = parallel.for_batches(spec, cfg.max_num_seqs, model.context_len).stages(spec)
    needs = stage_bytes(spec, cfg.tp, stages, precision.weights, dtype,
                        precision.kv, precision.quantization, cfg.max_num_batched_tokens,
                        cfg.max_num_seqs)
    big = max(needs, key=lambda n: n.total(tokens))
    # a speech model's cross-attention cache is in the activations' reserve: show it as cache
    cross = cfg.max_num_seqs * cross_bytes_per_seq(spec, cfg.tp, precision.kv)
    return Need(cfg.name, cfg.tp, big.total(tokens), cfg.pp,
                (("weights", big.weights), ("kv_cache", tokens * big.kv_per_token + cross),
                 ("activations", big.activations - cross)))


def resolve_tp(cfg: DeploymentConfig, model: ModelConfig, precision: Precision,
               plan: Plan) -> tuple[DeploymentConfig, Need]:
    """``cfg`` with ``tp: auto`` made the smallest tensor-parallel size whose replicas all
    fit the free memory of ``plan``'s devices (the planner's bytes per device, as any other
    deployment's), and its need; any other ``cfg`` as it is."""
    if cfg.tp != "auto":
        if not isinstance(cfg.tp, int) or cfg.tp < 1:
            raise ValueError(f"{cfg.name}: tp must be an integer >= 1 or auto, got {cfg.tp!r}")
        return cfg, deployment_need(cfg, model, precision)
    devices = len(plan.budgets)
    options = [t for t in range(1, devices // cfg.pp + 1) if model.spec.tp_ok(t)]
    why = f"{devices} devices"
    for t in options:
        trial = dataclasses.replace(cfg, tp=t)
        need = deployment_need(trial, model, precision)
        scratch = Plan(plan.budgets, dict(plan.assigned), dict(plan.needs))
        try:
            place(plan.budgets, [dataclasses.replace(need, name=f"{cfg.name}/{i}")
                                 for i in range(cfg.replicas)], scratch)
        except ValueError as e:
            why = str(e)
            continue
        return trial, need
    raise ValueError(f"{cfg.name}: tp: auto: no tensor-parallel size of "
                     f"{options or '(none splits its heads)'} fits; at the largest: {why}")


def _start_replica(cfg: DeploymentConfig, model: ModelConfig, devices: list[Device],
                   key: str, tokenizer, spare_cores: list[int],
                   precision: Precision) -> AsyncLLMEngine | AsyncEncoder:
    """Start one replica's supervised engine on ``devices``; ``key`` labels its processes.
    An LLM's engine core runs on ``spare_cores`` (if any: the cores no device has)."""
    parallel, policy = cfg.parallel_config(), RestartPolicy(max_restarts=cfg.max_restarts)
    if model.kind == "recommender":
        def recommender() -> RecommenderEngine:
            return RecommenderEngine(model, cfg.tp, devices, label=key,
                                     step_timeout_s=cfg.step_timeout_s)

        return AsyncEncoder(recommender, cfg.max_batch_size, cfg.max_queue_delay_ms,
                            cfg.preferred_batch_sizes, cfg.name, policy, method="score_checked")
    if model.is_encoder:
        def encoder() -> EncoderEngine:
            return EncoderEngine(model, parallel, devices,
                                 max_batch_tokens=cfg.max_batch_size * model.context_len,
                                 max_batch_size=cfg.max_batch_size, label=key,
                                 step_timeout_s=cfg.step_timeout_s)

        return AsyncEncoder(encoder, cfg.max_batch_size, cfg.max_queue_delay_ms,
                            cfg.preferred_batch_sizes, cfg.name, policy)

    return AsyncLLMEngine.spawn(model, devices[:parallel.world_size], cfg.cache_config(),
                                cfg.scheduler_config(), cfg.name, key, tokenizer, policy,
                                cfg.step_timeout_s, spare_cores, precision, parallel)


class ModelHost:
    def __init__(self, devices: list[Device]) -> None:
        self.devices = {d.name: d for d in devices}
        self.spare_cores = sorted(set(os.sched_getaffinity(0)).difference(
            *(d.cores for d in devices)))
        self.plan = Plan({d.name: d.memory_budget for d in devices})
        self.deployments: dict[str, Deployment] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.changing: dict[str, str] = {}  # name -> "LOADING" or "UNLOADING", while it does
        self._lock = threading.Lock()  # load/unload one at a time; serving is not blocked

    def load(self, cfg: DeploymentConfig) -> Deployment:
        """Place and start ``cfg``; on any error nothing changes (``ValueError`` says why)."""
        with self._lock:
            if cfg.name in self.deployments:
                raise ValueError(f"model {cfg.name!r} is already loaded")
            self.changing[cfg.name] = "LOADING"
            try:
                return self._load(cfg)
            finally:
                self.changing.pop(cfg.name, None)

    def _load(self, cfg: DeploymentConfig) -> Deployment:
        """``load``'s work; the caller holds the lock."""
        model = cfg.model_config()
        precision = choose(model, next(iter(self.devices.values())).kind)
        cfg, need = resolve_tp(cfg, model, precision, self.plan)
        tokenizer, template = load_tokenizer(model), load_chat_template(cfg.path)
        keys = [f"{cfg.name}/{i}" for i in range(cfg.replicas)]
        on_ray = cfg.executor == "ray"
        speech = SpeechInput(model.path, model.spec) \
            if isinstance(model.spec, WhisperSpec) else None  # its files are checked now
        if not on_ray:
            place(self.plan.budgets, [dataclasses.replace(need, name=k) for k in keys],
                  self.plan)  # every replica fits, or none is placed
        replicas: list[Replica] = []
        try:
            for key in keys:
                if on_ray:
                    names = [f"ray:{key}:rank{r}" for r in range(need.num_devices)]
                    devices = [Device("cpu", r, tuple(range(cfg.ray_cpus_per_device)),
                                      need.bytes_per_device)
                               for r in range(need.num_devices)]
                else:
                    names = self.plan.assigned[key]
                    devices = [dataclasses.replace(self.devices[n],
                                                   memory_budget=need.bytes_per_device)
                               for n in names]
                replicas.append(Replica(_start_replica(cfg, model, devices, key, tokenizer,
                                                       self.spare_cores, precision), names))
        except BaseException as e:
            for r in replicas:
                r.shutdown(0)
            for key in keys:
                release(self.plan, key)
            if isinstance(e, Exception) and not isinstance(e, ValueError):
                raise ValueError(f"model {cfg.name!r} failed to start: {e}") from e
            raise
        dep = Deployment(cfg, model, replicas, tokenizer, template, need.bytes_per_device,
                         precision, speech)
        level = logging.INFO if precision.kernels == "native" else logging.WARNING
        log.log(level, "%s: %s (%s)", cfg.name, precision.label, precision.note)
        self.deployments[cfg.name] = dep
        return dep

    def add_pipeline(self, config: PipelineConfig) -> Pipeline:
        """Validate ``config`` against the loaded models and serve it under its name."""
        if config.name in self.deployments or config.name in self.pipelines:
            raise ValueError(f"{config.file}: the name {config.name!r} is taken")
        pipeline = Pipeline(config, self)
        self.pipelines[config.name] = pipeline
        return pipeline

    def unload(self, name: str, drain_timeout_s: float = 10.0) -> None:
        """Stop taking requests for ``name`` at once, let the running ones finish for up to
        ``drain_timeout_s`` (then end them with ``EngineUnavailable``), free its devices.
        Call it from a thread other than the event loop's: it blocks."""
        with self._lock:
            users = [p.name for p in self.pipelines.values() if name in p.models()]
            if name in self.deployments and users:
                raise ValueError(f"model {name!r} is used by pipeline {users[0]!r}")
            dep = self.deployments.pop(name, None)
            if dep is None:
                raise KeyError(name)
            self.changing[name] = "UNLOADING"
            try:
                for i, replica in enumerate(dep.replicas):
                    replica.shutdown(drain_timeout_s)
                    release(self.plan, f"{name}/{i}")
            finally:
                self.changing.pop(name, None)

    def get(self, name: str) -> Deployment:
        return self.deployments[name]

    def index(self) -> list[dict]:
        rows = []
        for name, dep in list(self.deployments.items()):
            replicas = dep.replica_rows()
            reasons = [r["reason"] for r in replicas if r["reason"]]
            rows.append({"name": name, "state": dep.state.value,
                         "reason": reasons[0] if reasons and not dep.ready else "",
                         "replicas": replicas, "bytes_per_device": dep.bytes_per_device,
                         "tp": dep.config.tp, "pp": dep.config.pp,
                         "executor": dep.config.executor,
                         "precision": dep.precision.label})
        return rows

    def status(self) -> dict:
        """The device map: each device's budget and what each replica placed on it holds
        (weights, KV cache, activation reserve: the planner's bytes), and each deployment's
        state, parallelism, devices and load (``api/routes/status.py`` adds latencies and
        filters by caller)."""
        devices = []
        for d, budget in self.plan.budgets.items():
            parts = []
            for key, devs in list(self.plan.assigned.items()):
                if d not in devs:
                    continue
                name, replica = key.rsplit("/", 1)
                need = self.plan.needs.get(key)
                if need is None:  # released since the listing (an unload finishing)
                    continue
                parts.append({"deployment": name, "replica": int(replica),
                              "bytes": need.bytes_per_device, **dict(need.parts)})
            devices.append({"name": d, "budget": budget, "used": self.plan.used(d),
                            "parts": parts})
        deployments = []
        for name, dep in list(self.deployments.items()):
            deployments.append({"name": name, "kind": dep.kind, "state": dep.state.value,
                                "tp": dep.config.tp, "pp": dep.config.pp,
                                "precision": dep.precision.label,
                                "replicas": dep.replica_rows(), **dep.load()})
        for name, what in list(self.changing.items()):
            if name not in self.deployments:
                deployments.append({"name": name, "state": what, "replicas": []})
        return {"devices": devices, "deployments": deployments}

    def device_usage(self) -> list[dict]:
        """Each device's budget, bytes planned, and the replicas on it with the kernel path
        each runs (``runtime/precision.py``)."""
        rows = []
        for d in self.plan.budgets:
            keys = [k for k, devs in self.plan.assigned.items() if d in devs]
            rows.append({"device": d, "budget": self.plan.budgets[d], "used": self.plan.used(d),
                         "models": keys, "kernels": {k: self._label(k) for k in keys}})
        return rows

    def _label(self, key: str) -> str:
        dep = self.deployments.get(key.rsplit("/", 1)[0])
        return dep.precision.label if dep is not None else "loading"

    def shutdown(self, drain_timeout_s: float = 10.0) -> None:
        self.pipelines.clear()
        for name in list(self.deployments):
            self.unload(name, drain_timeout_s)
