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

Recommendation, over a catalogue (a JSON list in the pipeline's folder of items, each with a
``name``, a ``text`` and a recommender's features: ``dense`` (one short of the model's dense
inputs: the query's similarity to the item is the last) and ``sparse`` (ids a feature)):

      - {name: candidates, kind: retrieve, source: embed, catalogue: items.json, k: 8}
      - {name: ranked, kind: rank, model: ranker, source: candidates, top_k: 3}

``retrieve`` gives the ``k`` items whose text is nearest the request's by cosine (the
catalogue embedded once, by the source step's model); ``rank`` scores them with a
recommender (one call, one sample an item) and gives the ``top_k`` names, best first, joined
by ", ".

Speech, the voice assistant's first stage: a pipeline whose first step is ``transcribe``
takes audio (mono samples and their rate) as its input, and later steps read the transcript
by the step's name (an ``embed`` step's ``source`` names the text it embeds; ``{input}`` is
the audio, so templates use the transcript's name):

      - {name: heard, kind: transcribe, model: whisper, language: en}
      - {name: embed, kind: embed, model: all-minilm-l6-v2, source: heard}

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

_KINDS = {"embed": "encoder", "nearest": None, "generate": "llm", "retrieve": None,
          "rank": "recommender", "transcribe": "speech"}


class PipelineOps(Protocol):
    """How a pipeline's steps reach models (the server routes them through admission)."""

    async def embed(self, model: str, texts: list[str]) -> np.ndarray: ...
    async def generate(self, model: str, prompt: str, max_tokens: int) -> str: ...
    async def score(self, model: str, dense: np.ndarray, values: np.ndarray,
                    lengths: np.ndarray) -> np.ndarray: ...
    async def transcribe(self, model: str, audio: np.ndarray, rate: int,
                         language: str | None, max_tokens: int | None) -> str: ...


@dataclass(frozen=True)
class Step:
    name: str
    kind: str
    model: str | None = None
    source: str | None = None
    labels: dict[str, list[str]] = field(default_factory=dict)
    template: str | dict[str, str] = "{input}"
    by: str | None = None
    max_tokens: int | None = None  # generate: 32 by default; transcribe: the model's most
    catalogue: str | None = None  # retrieve: a JSON file of items beside pipeline.yaml
    k: int = 8  # retrieve: candidates
    top_k: int = 3  # rank: items in the answer
    language: str | None = None  # transcribe: the audio's language (default: English)
    items: tuple = ()  # the catalogue, read at load


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
                step = Step(**{k: v for k, v in raw.items() if k != "items"})
            except TypeError as e:
                raise ValueError(f"{file}: step {i + 1}: {e}") from None
            if step.catalogue is not None:
                step = Step(**{**step.__dict__, "items": _catalogue(folder, file, step)})
            _check_step(file, step, seen, audio=(steps[0] if steps else step).kind
                        == "transcribe")
            seen.add(step.name)
            steps.append(step)
        return PipelineConfig(str(data.get("name") or Path(folder).name), tuple(steps), file)

    @property
    def takes_audio(self) -> bool:
        """The input is audio (the first step transcribes it), not text."""
        return self.steps[0].kind == "transcribe"


def _check_step(file: str, step: Step, seen: set[str], audio: bool) -> None:
    """``audio``: the pipeline's input is audio (its first step transcribes)."""
    where = f"{file}: step {step.name!r}"
    if step.name in seen or step.name == "input":
        raise ValueError(f"{where}: the name is taken")
    if step.kind not in _KINDS:
        raise ValueError(f"{where}: kind {step.kind!r} is not one of {sorted(_KINDS)}")
    if _KINDS[step.kind] and not step.model:
        raise ValueError(f"{where}: needs a model")
    if step.kind == "transcribe" and seen:
        raise ValueError(f"{where}: transcribe must be the first step (it reads the "
                         "pipeline's audio input)")
    if step.kind == "embed" and step.source is not None and step.source not in seen:
        raise ValueError(f"{where}: source names no earlier step")
    if audio and step.kind == "embed" and step.source is None:
        raise ValueError(f"{where}: the input is audio; name the text to embed with source "
                         "(the transcribe step)")
    if step.kind == "nearest" and (step.source not in seen or not step.labels):
        raise ValueError(f"{where}: needs source (an earlier embed step) and labels")
    if step.kind == "retrieve" and (step.source not in seen or not step.items or step.k < 1):
        raise ValueError(f"{where}: needs source (an earlier embed step), a catalogue and "
                         "k >= 1")
    if step.kind == "rank" and (step.source not in seen or step.top_k < 1):
        raise ValueError(f"{where}: needs source (an earlier retrieve step) and top_k >= 1")
    if step.by is not None and step.by not in seen:
        raise ValueError(f"{where}: by names no earlier step")
    templates = step.template.values() if isinstance(step.template, dict) else [step.template]
    for t in templates:
        for _, key, _, _ in string.Formatter().parse(t):
            if key is not None and key not in seen | {"input"}:
                raise ValueError(f"{where}: template uses {{{key}}}, which is neither "
                                 "input nor an earlier step")
            if key == "input" and audio and step.kind == "generate":
                raise ValueError(f"{where}: the input is audio; the template names the "
                                 "transcribe step's text instead of {input}")


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

    async def run(self, request: str | tuple[np.ndarray, int], ops: PipelineOps
                  ) -> dict[str, Any]:
        """Every step's output by name, and ``output``: the last step's. ``request``: text,
        or ``(samples, rate)`` for a pipeline that takes audio. A step's failure is a
        ``PipelineError`` whose message starts with the step's name and whose ``__cause__``
        is what the step raised (the caller maps it: a refusal stays a refusal)."""
        ctx: dict[str, Any] = {"input": request}
        for step in self.config.steps:
            try:
                ctx[step.name] = await getattr(self, f"_{step.kind}")(step, ctx, ops)
            except Exception as e:
                raise PipelineError(f"step {step.name!r} ({step.kind}) failed: {e}") from e
        ctx["output"] = ctx[self.config.steps[-1].name]
        return ctx

    def outputs(self, ctx: dict[str, Any]) -> list[tuple[str, str]]:
        """Each step's output as text, by name (not the vectors of embed steps): what the
        pipeline answers besides its final output."""
        out = []
        for s in self.config.steps:
            if s.kind == "embed":
                continue
            value = ctx[s.name]
            if s.kind == "retrieve":
                value = ", ".join(item[0] for item, _ in value)
            out.append((s.name, str(value)))
        return out

    async def _embed(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> np.ndarray:
        return (await ops.embed(step.model, [ctx[step.source or "input"]]))[0]

    async def _transcribe(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> str:
        samples, rate = ctx["input"]
        return await ops.transcribe(step.model, samples, rate, step.language, step.max_tokens)

    async def _nearest(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> str:
        if step.name not in self._examples:  # the examples' vectors, computed once
            source = next(s for s in self.config.steps if s.name == step.source)
            labels = [label for label, texts in step.labels.items() for _ in texts]
            texts = [t for texts in step.labels.values() for t in texts]
            self._examples[step.name] = (labels, _unit(await ops.embed(source.model, texts)))
        labels, examples = self._examples[step.name]
        return labels[int(np.argmax(examples @ _unit(ctx[step.source][None])[0]))]

    async def _retrieve(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> list:
        """The ``k`` items nearest the request, with their similarity, nearest first."""
        if step.name not in self._examples:  # the catalogue's vectors, computed once
            source = next(s for s in self.config.steps if s.name == step.source)
            texts = [item[1] for item in step.items]
            self._examples[step.name] = ([], _unit(await ops.embed(source.model, texts)))
        _, vectors = self._examples[step.name]
        sims = vectors @ _unit(ctx[step.source][None])[0]
        best = np.argsort(-sims, kind="stable")[:step.k]
        return [(step.items[i], float(sims[i])) for i in best]

    async def _rank(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> str:
        """The candidates' recommender scores (the item's features, its similarity as the
        last dense feature); the ``top_k`` names, best first."""
        candidates = ctx[step.source]
        dense = np.array([[*item[2], sim] for item, sim in candidates], np.float32)
        features = len(candidates[0][0][3])
        lengths = np.array([[len(item[3][f]) for item, _ in candidates]
                            for f in range(features)], np.int32)
        values = np.array([i for f in range(features) for item, _ in candidates
                           for i in item[3][f]], np.int64)
        scores = await ops.score(step.model, dense, values, lengths)
        order = np.argsort(-np.asarray(scores), kind="stable")[:step.top_k]
        return ", ".join(candidates[i][0][0] for i in order)

    async def _generate(self, step: Step, ctx: dict[str, Any], ops: PipelineOps) -> str:
        template = step.template
        if isinstance(template, dict):
            template = template[ctx[step.by]]
        prompt = template.format(**{k: v for k, v in ctx.items() if isinstance(v, str)})
        return await ops.generate(step.model, prompt, step.max_tokens or 32)


def _catalogue(folder: str, file: str, step: Step) -> tuple:
    """The items of ``step.catalogue`` (see the module's docstring), checked."""
    import json

    path = Path(folder) / step.catalogue
    try:
        items = json.loads(path.read_text())
        out = tuple((str(i["name"]), str(i["text"]), tuple(float(x) for x in i["dense"]),
                     tuple(tuple(int(x) for x in f) for f in i["sparse"])) for i in items)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: step {step.name!r}: catalogue {path}: {e!r}; expected a "
                         "JSON list of {name, text, dense, sparse}") from None
    if not out:
        raise ValueError(f"{file}: step {step.name!r}: catalogue {path} is empty")
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
