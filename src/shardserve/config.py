"""Configuration: a small tree of frozen dataclasses, validated on construction.

Each field's ``help`` metadata is its one-line documentation and the CLI's help text.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from dataclasses import fields as fields_of
from functools import cached_property
from pathlib import Path
from typing import Any

from shardserve.planner.memory import block_weights, decode_kv_tokens, parse_bytes
from shardserve.planner.partition import Stage, parse_split, split_layers
from shardserve.planner.specs import (
    DLRMSpec,
    EncoderSpec,
    TransformerSpec,
    WhisperSpec,
    canonical_dtype,
    check_quantization,
    spec_from_hf,
)

_CONVERT_HINT = (
    "shardserve loads safetensors only (a pickle file can run code when loaded). Convert it once "
    "where you trust the file, e.g. `AutoModelForCausalLM.from_pretrained(dir)"
    ".save_pretrained(dir, safe_serialization=True)`"
)


@dataclass(frozen=True)
class ModelConfig:
    path: str = field(metadata={"help": "model folder in Hugging Face layout (config.json, "
                                        "*.safetensors, optional tokenizer.json)"})
    dtype: str = field(default="auto", metadata={
        "help": "weights and compute dtype: auto (the checkpoint's), float32, bfloat16, float16"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest sequence (prompt + output) served; default: the model's context"})
    quantization: str | None = field(default=None, metadata={
        "help": "weight-only quantization of the linear layers and LM head, done at load: "
                "int8 (a scale per output feature; a quarter of float32's bytes)"})

    def __post_init__(self) -> None:
        check_quantization(self.quantization)
        folder = Path(self.path)
        if not folder.is_dir():
            raise ValueError(f"model folder {self.path!r} does not exist")
        if not (folder / "config.json").is_file():
            raise ValueError(f"model folder {self.path!r} has no config.json; a model folder "
                             "holds config.json and *.safetensors in Hugging Face layout")
        if not self.weight_files:
            if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
                raise ValueError(f"model folder {self.path!r} holds only pickle weights "
                                 f"(*.bin / *.pt). {_CONVERT_HINT}")
            raise ValueError(f"model folder {self.path!r} has no *.safetensors weights")
        if self.dtype != "auto":
            canonical_dtype(self.dtype)
        if self.max_model_len is not None and not (
                0 < self.max_model_len <= self.spec.max_position):
            raise ValueError(f"max_model_len={self.max_model_len} must be in "
                             f"1..{self.spec.max_position} (the model's max_position_embeddings)")
        if self.quantization and isinstance(self.spec, WhisperSpec):
            raise ValueError("quantization of Whisper is not supported; serve it in its dtype "
                             "(leave quantization unset)")

    @cached_property
    def hf_config(self) -> dict[str, Any]:
        try:
            with open(Path(self.path) / "config.json") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}/config.json is not valid JSON: {e}") from None

    @cached_property
    def spec(self) -> TransformerSpec | EncoderSpec:
        if not self.hf_config.get("architectures"):
            raise ValueError(f"{self.path}/config.json has no 'architectures' list")
        return spec_from_hf(self.hf_config)

    @property
    def is_encoder(self) -> bool:
        return isinstance(self.spec, EncoderSpec)

    @property
    def kind(self) -> str:
        """The deployment kind that serves this model: llm, speech (the same engine, audio
        in), encoder or recommender."""
        if isinstance(self.spec, EncoderSpec):
            return "encoder"
        if isinstance(self.spec, WhisperSpec):
            return "speech"
        return "recommender" if isinstance(self.spec, DLRMSpec) else "llm"

    @cached_property
    def weight_files(self) -> list[str]:
        return sorted(str(p) for p in Path(self.path).glob("*.safetensors"))

    @property
    def torch_dtype_name(self) -> str:
        return self.spec.dtype if self.dtype == "auto" else canonical_dtype(self.dtype)

    @property
    def context_len(self) -> int:
        return self.max_model_len or self.spec.max_position

    @cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: config.json's and generation_config.json's (Llama-3 lists
        several there: <|end_of_text|>, <|eom_id|>, <|eot_id|>), in that order."""
        ids = list(self.spec.eos_token_ids)
        path = Path(self.path) / "generation_config.json"
        if path.is_file():
            try:
                extra = json.loads(path.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}: not a JSON object ({e})") from None
            extra = [extra] if isinstance(extra, int) else extra or []
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in extra):
                raise ValueError(f"{path}: eos_token_id must be an integer or a list of them")
            ids += [i for i in extra if i not in ids]
        return tuple(ids)

    @property
    def tokenizer_path(self) -> str | None:
        p = Path(self.path) / "tokenizer.json"
        return str(p) if p.is_file() else None


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = field(default=1, metadata={
        "help": "devices each pipeline stage's layers are split across (tensor parallel)"})
    pipeline_parallel_size: int = field(default=1, metadata={
        "help": "pipeline stages: the decoder layers split into this many contiguous groups, "
                "each on tensor_parallel_size devices of its own (tp x pp devices in all)"})
    pipeline_split: str | None = field(default=None, metadata={
        "help": "decoder layers of each pipeline stage, e.g. 5,3 or 7.5,4.5 (half a layer: "
                "its attention or its MLP); default: even work a decode step (weights read, "
                "the last stage's LM head too, and the KV cache of a typical micro-batch)"})
    executor: str = field(default="local", metadata={
        "help": "local (worker processes on this machine) or ray (Ray actors, placed by "
                "placement groups across the machines of a Ray cluster)"})
    ray_address: str | None = field(default=None, metadata={
        "help": "with --executor ray: the cluster to join (auto: the one `ray start` runs on "
                "this machine); default: auto when serving, a local Ray offline"})

    def __post_init__(self) -> None:
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor {self.executor!r}: use local or ray")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size} must be "
                             ">= 1")
        parse_split(self.pipeline_split)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def stages(self, spec: TransformerSpec | EncoderSpec, kv_tokens: int = 0) -> list[Stage]:
        """The pipeline stages of ``spec`` (one for an encoder or at pp=1): the named split,
        else the balanced one, its attention blocks weighing ``kv_tokens`` positions of cache
        a step (``for_batches``)."""
        return split_layers(spec.num_layers, self.pipeline_parallel_size,
                            parse_split(self.pipeline_split), block_weights(spec, kv_tokens))

    def for_batches(self, spec: TransformerSpec | EncoderSpec, max_num_seqs: int,
                    max_len: int) -> ParallelConfig:
        """This config with its split named: the balanced one for micro-batches of
        ``max_num_seqs / pp`` sequences up to ``max_len`` tokens, where none was given (every
        later ``stages`` call, the workers' included, then sees the same split)."""
        pp = self.pipeline_parallel_size
        if pp == 1 or self.pipeline_split or not isinstance(spec, TransformerSpec):
            return self
        stages = self.stages(spec, decode_kv_tokens(max_num_seqs, pp, max_len))
        return dataclasses.replace(self, pipeline_split=",".join(str(st.size) for st in stages))

    def check_model(self, spec: TransformerSpec) -> None:
        """Refuse a tp the model's heads cannot be split by, naming the sizes that work, and
        a pipeline split the layers do not allow."""
        if isinstance(spec, EncoderSpec) and (self.pipeline_parallel_size > 1
                                              or self.executor != "local"):
            raise ValueError("pipeline_parallel_size > 1 and the ray executor serve generative "
                             "models; an encoder runs on tensor_parallel_size local devices")
        if isinstance(spec, WhisperSpec) and self.pipeline_parallel_size > 1:
            raise ValueError("Whisper runs on tensor_parallel_size devices, in one pipeline "
                             "stage (pipeline_parallel_size 1)")
        self.stages(spec)
        tp = self.tensor_parallel_size
        if not spec.tp_ok(tp):
            ok = [t for t in range(1, spec.num_heads + 1) if spec.tp_ok(t)]
            raise ValueError(
                f"tensor_parallel_size={tp} does not divide the model's {spec.num_heads} "
                f"attention heads ({spec.num_kv_heads} KV heads, intermediate size "
                f"{spec.intermediate_size}); valid sizes: {ok}")


@dataclass(frozen=True)
class DeviceConfig:
    devices: str = field(default="cpu:1", metadata={
        "help": "devices to use: cpu:N (N worker processes sharing the cores) or cuda "
                "(every visible GPU)"})
    device_memory: str | None = field(default=None, metadata={
        "help": "memory budget per device, e.g. 2GiB; default: host memory / N (cpu) or the "
                "GPU's memory (cuda)"})

    def __post_init__(self) -> None:
        if self.device_memory is not None:
            parse_bytes(self.device_memory)  # raises a ValueError that names the string

    @property
    def budget_bytes(self) -> int | None:
        return None if self.device_memory is None else parse_bytes(self.device_memory)



@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    num_blocks: int | None = field(default=None, metadata={
        "help": "KV-cache blocks per device; default: as many as the budget holds after "
                "weights and activations, up to what max_num_seqs full-length sequences need"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "reuse the KV blocks of a prompt prefix seen before"})

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=64, metadata={
        "help": "most sequences running at once"})
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "most tokens in one step; longer prompts are prefilled in chunks"})
    async_scheduling: bool = field(default=True, metadata={
        "help": "with one worker, schedule the next step while this one runs (the worker "
                "feeds itself the tokens it samples); no effect with tp or pp > 1"})

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")


@dataclass(frozen=True)
class DeploymentConfig:
    """One model of a repository, from its folder's ``model.yaml``."""

    name: str = field(metadata={"help": "the name clients call the model by"})
    path: str = field(metadata={"help": "the model folder (config.json, *.safetensors)"})
    kind: str = field(default="llm", metadata={
        "help": "llm (generative, continuous batching), speech (Whisper: audio in, text out, "
                "continuous batching), encoder (embeddings / classifier, dynamic batching) or "
                "recommender (DLRM scores, dynamic batching; its tables sharded over tp "
                "devices)"})
    dtype: str = field(default="auto", metadata={"help": "as ModelConfig.dtype"})
    quantization: str | None = field(default=None, metadata={
        "help": "as ModelConfig.quantization (int8)"})
    tp: int | str = field(default=1, metadata={
        "help": "tensor-parallel size (of each pipeline stage); auto: the smallest that fits "
                "the free devices when the model loads"})
    pp: int = field(default=1, metadata={
        "help": "pipeline stages (llm): tp x pp devices per replica"})
    pipeline_split: str | None = field(default=None, metadata={
        "help": "decoder layers of each pipeline stage, e.g. [5, 3] or [7.5, 4.5] (half a "
                "layer: its attention or its MLP); default: even decode work"})
    executor: str = field(default="local", metadata={
        "help": "llm: local (worker processes here) or ray (Ray actors across a cluster)"})
    ray_address: str | None = field(default=None, metadata={
        "help": "executor ray: the Ray cluster to join; default auto (the one `ray start` "
                "runs on this machine)"})
    ray_cpus_per_device: int = field(default=1, metadata={
        "help": "executor ray: CPUs each rank's actor reserves (and its threads)"})
    replicas: int = field(default=1, metadata={
        "help": "copies of the model, each on its own devices; requests go to the least busy"})
    max_model_len: int | None = field(default=None, metadata={"help": "as ModelConfig"})
    max_num_seqs: int = field(default=16, metadata={"help": "as SchedulerConfig"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "as SchedulerConfig"})
    async_scheduling: bool = field(default=True, metadata={"help": "as SchedulerConfig"})
    block_size: int = field(default=16, metadata={"help": "as CacheConfig"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "as CacheConfig"})
    max_batch_size: int = field(default=32, metadata={
        "help": "encoder: most requests in one forward pass"})
    max_queue_delay_ms: float = field(default=5.0, metadata={
        "help": "encoder: how long the oldest request may wait for others to join its batch"})
    preferred_batch_sizes: tuple[int, ...] = field(default=(), metadata={
        "help": "encoder: batch sizes to cut at without waiting further"})
    tenants: tuple[str, ...] = field(default=(), metadata={
        "help": "tenants (of the --auth file) that may use this model, besides those whose "
                "entry lists it"})
    step_timeout_s: float = field(default=300.0, metadata={
        "help": "a step (or encoder batch) still running after this many seconds means a "
                "worker is hung: the group is restarted"})
    max_restarts: int = field(default=5, metadata={
        "help": "consecutive failed restarts of a replica before it is left FAILED"})

    def model_config(self) -> ModelConfig:
        return ModelConfig(self.path, self.dtype, self.max_model_len, self.quantization)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(self.tp, self.pp, self.pipeline_split, self.executor,
                              self.ray_address or ("auto" if self.executor == "ray" else None))

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, None, self.enable_prefix_caching)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens,
                               self.async_scheduling)

    @staticmethod
    def from_folder(folder: str) -> DeploymentConfig:
        """Read ``folder/model.yaml``; errors name the file and the field."""
        import yaml

        file = Path(folder) / "model.yaml"
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{file}: cannot read: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a mapping of fields")
        known = {f.name for f in fields_of(DeploymentConfig)} - {"path"}
        unknown = sorted(set(data) - known - {"weights"})
        if unknown:
            raise ValueError(f"{file}: unknown field {unknown[0]!r}; known: {sorted(known)}")
        weights = str((Path(folder) / str(data.pop("weights", "."))).resolve())
        data.setdefault("name", Path(folder).name)
        try:
            cfg = DeploymentConfig(path=weights, **data)
        except TypeError as e:
            raise ValueError(f"{file}: {e}") from None
        if cfg.kind not in ("llm", "speech", "encoder", "recommender"):
            raise ValueError(f"{file}: kind {cfg.kind!r} is not served; use llm, speech, "
                             "encoder or recommender")
        _check_fields(file, cfg)
        try:
            check_quantization(cfg.quantization)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        for name in ("preferred_batch_sizes", "tenants"):
            object.__setattr__(cfg, name, tuple(getattr(cfg, name)))
        if isinstance(cfg.pipeline_split, list | tuple):
            object.__setattr__(cfg, "pipeline_split", ",".join(map(str, cfg.pipeline_split)))
        try:  # tp: auto is resolved where the model loads; the rest is checked now
            dataclasses.replace(cfg, tp=1 if cfg.tp == "auto" else cfg.tp).parallel_config()
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        if (cfg.pp > 1 or cfg.executor != "local") and cfg.kind != "llm":
            raise ValueError(f"{file}: pp and executor: ray serve generative models (kind: "
                             "llm); an encoder runs on tp local devices")
        return cfg


def _check_fields(file: Path, cfg: DeploymentConfig) -> None:
    """Each field of a model.yaml has the type its documentation says (a string where a list
    belongs is an error, not a list of letters)."""
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    def is_num(x):
        return isinstance(x, int | float) and not isinstance(x, bool)

    checks = {"name": (lambda x: isinstance(x, str) and x and "/" not in x,
                       "a non-empty string without '/'"),
              "dtype": (lambda x: isinstance(x, str), "a string"),
              "executor": (lambda x: x in ("local", "ray"), "local or ray"),
              "ray_address": (lambda x: x is None or isinstance(x, str), "an address string"),
              "quantization": (lambda x: x is None or isinstance(x, str),
                               "a string (int8) or absent"),
              "max_model_len": (lambda x: x is None or (is_int(x) and x >= 1),
                                "an integer >= 1"),
              "max_queue_delay_ms": (lambda x: is_num(x) and x >= 0, "a number >= 0"),
              "step_timeout_s": (lambda x: is_num(x) and x > 0, "a number > 0"),
              "max_restarts": (lambda x: is_int(x) and x >= 0, "an integer >= 0"),
              "enable_prefix_caching": (lambda x: isinstance(x, bool), "true or false"),
              "pipeline_split": (lambda x: x is None or isinstance(x, str) or (
                  isinstance(x, list | tuple) and all(is_num(v) and v >= 0.5 for v in x)),
                  "a list of layer counts, one per stage, e.g. [5, 3] or [7.5, 4.5]"),
              "preferred_batch_sizes": (lambda x: isinstance(x, list | tuple)
                                        and all(is_int(v) and v >= 1 for v in x),
                                        "a list of integers >= 1"),
              "tenants": (lambda x: isinstance(x, list | tuple)
                          and all(isinstance(v, str) and v for v in x),
                          "a list of tenant names, e.g. [acme]")}
    checks["tp"] = (lambda x: x == "auto" or (is_int(x) and x >= 1), "an integer >= 1 or auto")
    checks.update({name: (lambda x: is_int(x) and x >= 1, "an integer >= 1")
                   for name in ("pp", "ray_cpus_per_device", "replicas", "max_num_seqs",
                                "max_num_batched_tokens", "block_size", "max_batch_size")})
    for name, (ok, what) in checks.items():
        if not ok(getattr(cfg, name)):
            raise ValueError(f"{file}: {name} must be {what}, got "
                             f"{getattr(cfg, name)!r:.60}")


def repository_configs(folder: str) -> list[DeploymentConfig]:
    """Every ``*/model.yaml`` under ``folder``, validated; names must be unique."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"model repository {folder!r} does not exist")
    configs = [DeploymentConfig.from_folder(str(p.parent))
               for p in sorted(root.glob("*/model.yaml"))]
    names = [c.name for c in configs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"{folder}: model name {sorted(dup)[0]!r} is used by two folders")
    return configs


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = field(default=1 << 20, metadata={
        "help": "largest request body accepted (bytes); larger ones get 413"})
    max_audio_bytes: int = field(default=25 << 20, metadata={
        "help": "largest body of an audio upload (/v1/audio/*) or a binary v2 inference "
                "request (bytes); larger ones get 413"})
    max_audio_seconds: float = field(default=1800.0, metadata={
        "help": "longest audio one transcription request may bring (seconds); longer is 400. "
                "Audio over one window (30 s) is transcribed window by window"})
    max_n: int = field(default=16, metadata={"help": "most completions one request may ask"})
    max_queue: int = field(default=256, metadata={
        "help": "requests a model holds beyond its max_num_seqs before answering 429"})
    request_timeout_s: float = field(default=600.0, metadata={
        "help": "a request not answered this many seconds after admission (queued or "
                "running) is aborted with 504"})
    drain_timeout_s: float = field(default=10.0, metadata={
        "help": "an unload lets running requests finish this long, then ends them with 503"})
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "a connection that has not sent a request's headers after this many seconds "
                "is closed"})
    body_timeout_s: float = field(default=30.0, metadata={
        "help": "a request whose body has not fully arrived after this many seconds gets 408"})
    max_connections: int = field(default=512, metadata={
        "help": "open client connections; more are closed at once"})
    allowed_origins: str = field(default="", metadata={
        "help": "comma-separated browser origins allowed to call the API (e.g. "
                "https://app.example.com); requests carrying any other Origin get 403"})

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_audio_bytes", "max_audio_seconds", "max_n",
                     "max_queue",
                     "request_timeout_s",
                     "header_timeout_s", "body_timeout_s", "max_connections"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.allowed_origins.split(",")
                         if o.strip())
