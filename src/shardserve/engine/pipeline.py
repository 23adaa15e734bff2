"""Server-side pipelines: steps over deployments, declared in a repository folder's
``pipeline.yaml``, run inside the server with no client round trip between steps.

    name: route
    steps:
      - {name: embed, kind: embed, model: all-minilm-l6-v2}          # the request's text
      - {name: intent, kind: nearest, source: embed,
         labels: {weather: ["will it rain"], greeting: ["hello there"]}}
      - {name: answer, kind: generate, model: demo-llama-random, by: intent, max_tokens: 24,
         template: {weather: "Forecast for: {input}\\n", greeting: "Reply to: {input}\\n"}}

Each step reads the request (``{input}``) and earlier steps' outputs by name: ``embed``
gives a vector, ``nearest`` the label whose examples are closest by cosine, ``generate`` the
text an LLM writes from the template (one per label of the ``by`` step, or a single string).
The last step's output is the pipeline's. A step that fails names itself in the error.

The steps reach their models through ``PipelineOps`` that the caller supplies (the server's
admission: the caller's tenant must be allowed every step model, each step counts against
its model's queue, and the request's deadline and connection hold for the whole pipeline).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shardserve.engine.errors import PipelineError

_KINDS = {"embed": "encoder", "nearest": None, "generate": "llm"}


class PipelineOps(Protocol):
    """How a pipeline's steps reach models (the server routes them through admission)."""

    async def embed(self, model: str, texts: list[str]) -> np.ndarray: ...
    async def generate(self, model: str, prompt: str, max_tokens: int) -> str: ...


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    model: str | None = None
    source: str | None = None
    labels: dict[str, list[str]] = field(default_factory=dict)
    template: str | dict[str, str] = "{input}"
    by: str | None = None
    max_tokens: int = 32


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    steps: tuple[Step, ...]
    file: str

    @staticmethod
    def from_folder(folder: str) -> PipelineConfig:
        import yaml

        file = str(Path(folder) / "pipeline.yaml")
        try:
            data = yaml.safe_load(Path(file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{file}: cannot read: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list) \
                or not data["steps"]:
            raise ValueError(f"{file}: expected a mapping with a non-empty steps list")
        steps, seen = [], set()
        for i, raw in enumerate(data["steps"]):
            try:
                step = Step(**raw)
            except TypeError as e:
                raise ValueError(f"{file}: step {i + 1}: {e}") from None
            _check_step(file, step, seen)
            seen.add(step.name)
            steps.append(step)
        return PipelineConfig(str(data.get("name") or Path(folder).name), tuple(steps), file)


def _check_step(file: str, step: Step, seen: set[str]) -> None:
    where = f"{file}: step {step.name!r}"
    if step.name in seen or step.name == "input":
        raise ValueError(f"{where}: the name is taken")
    if step.kind not in _KINDS:
        raise ValueError(f"{where}: kind {step.kind!r} is not one of {sorted(_KINDS)}")
    if _KINDS[step.kind] and not step.model:
        raise ValueError(f"{where}: needs a model")
    if step.kind == "nearest" and (step.source not in seen or not step.labels):
        raise ValueError(f"{where}: needs source (an earlier embed step) and labels")
    if step.by is not None and step.by not in seen:
        raise ValueError(f"{where}: by names no earlier step")
    templates = step.template.values() if isinstance(step.template, dict) else [step.template]
    for t in templates:
        for _, key, _, _ in string.Formatter().parse(t):
            if key is not None and key not in seen | {"input"}:
                raise ValueError(f"{where}: template uses {{{key}}}, which is neither "
                                 "input nor an earlier step")


class Pipeline:
    """A validated pipeline over a host's deployments."""

    def __init__(self, config: PipelineConfig, host: Any) -> None:
        for step in config.steps:
            if not step.model:
                continue
            dep = host.deployments.get(step.model)
            if dep is None:
                raise ValueError(f"{config.file}: step {step.name!r} uses model "
                                 f"{step.model!r}, which is not loaded")
            kind = dep.kind
            if kind != _KINDS[step.kind]:
                raise ValueError(f"{config.file}: step {step.name!r} ({step.kind}) needs an "
                                 f"{_KINDS[step.kind]} model; {step.model!r} is {kind}")
        self.config, self.host = config, host
        self._examples: dict[str, tuple[list[str], np.ndarray]] = {}

    @property
    def name(self) -> str:
        return self.config.name

    def models(self) -> set[str]:
        return {s.model for s in self.config.steps if s.model}

    async def run(self, text: str, ops: PipelineOps) -> dict[str, Any]:
        """Every step's output by name, and ``output``: the last step's. A step's failure is a
        ``PipelineError`` whose message starts with the step's name and whose ``__cause__``
        is what the step raised (the caller maps it: a refusal stays a refusal)."""
        ctx: dict[str, Any] = {"input": text}
        for step in self.config.steps:
            try:
                ctx[step.name] = await getattr(self, f"_{step.kind}")(step, ctx, ops)
            except Exception as e:
                raise PipelineError(f"step {step.name!r} ({step.kind}) failed: {e}") from e
        ctx["output"] = ctx[self.config.steps[-1].name]
        return ctx

    async def _embed(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> np.ndarray:
        return (await ops.embed(step.model, [ctx["input"]]))[0]

    async def _nearest(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> str:
        if step.name not in self._examples:  # the examples' vectors, computed once
            source = next(s for s in self.config.steps if s.name == step.source)
            labels = [label for label, texts in step.labels.items() for _ in texts]
            texts = [t for texts in step.labels.values() for t in texts]
            self._examples[step.name] = (labels, _unit(await ops.embed(source.model, texts)))
        labels, examples = self._examples[step.name]
        return labels[int(np.argmax(examples @ _unit(ctx[step.source][None])[0]))]

    async def _generate(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> str:
        template = step.template
        if isinstance(template, dict):
            template = template[ctx[step.by]]
        prompt = template.format(**{k: v for k, v in ctx.items() if isinstance(v, str)})
        return await ops.generate(step.model, prompt, step.max_tokens)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
