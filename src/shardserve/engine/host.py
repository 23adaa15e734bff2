"""ModelHost: the deployments of one server, by name, placed on devices by a memory plan and
loaded and unloaded live (Triton's explicit model control)."""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from shardserve.config import (
    CacheConfig,
    DeploymentConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from shardserve.engine.async_engine import AsyncLLMEngine
from shardserve.engine.batcher import DynamicBatcher
from shardserve.engine.encoder_engine import EncoderEngine
from shardserve.engine.llm_engine import LLMEngine
from shardserve.engine.pipeline import Pipeline, PipelineConfig
from shardserve.models.registry import check_architecture
from shardserve.planner.memory import (
    activation_bytes,
    kv_bytes_per_token,
    weight_bytes_per_device,
)
from shardserve.planner.placement import Need, Plan, place, release
from shardserve.runtime.devices import Device


@dataclass
class Replica:
    engine: AsyncLLMEngine | EncoderEngine
    devices: list[str]
    inflight: int = 0  # admitted HTTP requests not yet answered (the API layer counts)
    batcher: DynamicBatcher | None = None  # encoders: requests meet here to share passes

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.engine.shutdown()


@dataclass
class Deployment:
    config: DeploymentConfig
    model: ModelConfig
    replicas: list[Replica]
    tokenizer: object | None
    chat_template: str | None
    bytes_per_device: int

    @property
    def is_encoder(self) -> bool:
        return self.model.is_encoder

    @property
    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas)

    def pick(self) -> Replica:
        """The replica with the fewest requests in flight."""
        return min(self.replicas, key=lambda r: r.inflight)


def load_chat_template(folder: str) -> str | None:
    path = Path(folder) / "chat_template.jinja"
    if path.is_file():
        return path.read_text()
    cfg = Path(folder) / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def deployment_need(cfg: DeploymentConfig, model: ModelConfig) -> Need:
    """Bytes per device: weights, one step's activations, and a KV cache that holds
    ``max_num_seqs`` sequences of full length (encoders: weights and a batch's
    activations)."""
    spec, dtype = model.spec, model.torch_dtype_name
    check_architecture(spec.architecture)
    ParallelConfig(cfg.tp).check_model(spec)
    if model.is_encoder != (cfg.kind == "encoder"):
        what, kind = ("an encoder", "encoder") if model.is_encoder else ("generative", "llm")
        raise ValueError(f"{cfg.name}: model.yaml says kind {cfg.kind!r} but "
                         f"{spec.architecture} is {what}; set kind: {kind}")
    weights = weight_bytes_per_device(spec, cfg.tp, dtype)
    if model.is_encoder:
        per_token = (4 * spec.hidden_size + 2 * spec.intermediate_size // cfg.tp) * 4
        act = cfg.max_batch_size * model.context_len * per_token
        return Need(cfg.name, cfg.tp, weights + act)
    act = activation_bytes(spec, cfg.tp, dtype, cfg.max_num_batched_tokens,
                           cfg.max_num_seqs)
    block = CacheConfig().block_size
    blocks = cfg.max_num_seqs * -(-model.context_len // block)
    kv = blocks * block * kv_bytes_per_token(spec, cfg.tp, dtype)
    return Need(cfg.name, cfg.tp, weights + act + kv)


def _start_replica(cfg: DeploymentConfig, model: ModelConfig, devices: list[Device],
                   names: list[str], tokenizer) -> Replica:
    parallel = ParallelConfig(cfg.tp)
    if model.is_encoder:
        engine = EncoderEngine(model, parallel, devices,
                               max_batch_tokens=cfg.max_batch_size * model.context_len,
                               max_batch_size=cfg.max_batch_size)
        batcher = DynamicBatcher(engine.encode, cfg.max_batch_size, cfg.max_queue_delay_ms,
                                 cfg.preferred_batch_sizes)
        return Replica(engine, names, batcher=batcher)
    engine = LLMEngine(model, parallel, devices, CacheConfig(),
                       SchedulerConfig(cfg.max_num_seqs, cfg.max_num_batched_tokens), tokenizer)
    return Replica(AsyncLLMEngine(engine), names)


class ModelHost:
    def __init__(self, devices: list[Device]) -> None:
        self.devices = {d.name: d for d in devices}
        self.plan = Plan({d.name: d.memory_budget for d in devices})
        self.deployments: dict[str, Deployment] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self._lock = threading.Lock()  # load/unload one at a time; serving is not blocked

    def load(self, cfg: DeploymentConfig) -> Deployment:
        """Place and start ``cfg``; on any error nothing changes."""
        from shardserve.llm import load_tokenizer

        with self._lock:
            if cfg.name in self.deployments:
                raise ValueError(f"model {cfg.name!r} is already loaded")
            model = ModelConfig(cfg.path, cfg.dtype, cfg.max_model_len)
            need = deployment_need(cfg, model)
            keys = [f"{cfg.name}/{i}" for i in range(cfg.replicas)]
            place(self.plan.budgets, [dataclasses.replace(need, name=k) for k in keys],
                  self.plan)  # every replica fits, or none is placed
            tokenizer, replicas = load_tokenizer(model), []
            try:
                for key in keys:
                    names = self.plan.assigned[key]
                    devices = [dataclasses.replace(self.devices[n],
                                                   memory_budget=need.bytes_per_device)
                               for n in names]
                    replicas.append(_start_replica(cfg, model, devices, names, tokenizer))
            except BaseException:
                for r in replicas:
                    r.shutdown()
                for key in keys:
                    release(self.plan, key)
                raise
            dep = Deployment(cfg, model, replicas, tokenizer, load_chat_template(cfg.path),
                             need.bytes_per_device)
            self.deployments[cfg.name] = dep
            return dep

    def add_pipeline(self, config: PipelineConfig) -> Pipeline:
        """Validate ``config`` against the loaded models and serve it under its name."""
        if config.name in self.deployments or config.name in self.pipelines:
            raise ValueError(f"{config.file}: the name {config.name!r} is taken")
        pipeline = Pipeline(config, self)
        self.pipelines[config.name] = pipeline
        return pipeline

    def unload(self, name: str) -> None:
        with self._lock:
            users = [p.name for p in self.pipelines.values() if name in p.models()]
            if name in self.deployments and users:
                raise ValueError(f"model {name!r} is used by pipeline {users[0]!r}")
            dep = self.deployments.pop(name, None)
            if dep is None:
                raise KeyError(name)
            for i, replica in enumerate(dep.replicas):
                replica.shutdown()
                release(self.plan, f"{name}/{i}")

    def get(self, name: str) -> Deployment:
        return self.deployments[name]

    def index(self) -> list[dict]:
        return [{"name": name, "state": "READY",
                 "replicas": [{"devices": r.devices} for r in dep.replicas],
                 "bytes_per_device": dep.bytes_per_device}
                for name, dep in list(self.deployments.items())]

    def device_usage(self) -> list[dict]:
        return [{"device": d, "budget": self.plan.budgets[d], "used": self.plan.used(d),
                 "models": [n for n, devs in self.plan.assigned.items() if d in devs]}
                for d in self.plan.budgets]

    def shutdown(self) -> None:
        self.pipelines.clear()
        for name in list(self.deployments):
            self.unload(name)
