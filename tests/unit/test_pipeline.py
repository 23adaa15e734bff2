import pytest

from shardserve.engine.pipeline import Pipeline, PipelineConfig
from shardserve.test_models import (
    ASSISTANT_PIPELINE,
    RECOMMEND_PIPELINE,
    ROUTE_PIPELINE,
    catalogue,
    dlrm_config,
)


def _write(tmp_path, text):
    (tmp_path / "pipeline.yaml").write_text(text)
    return str(tmp_path)


def test_the_shipped_route_pipeline_parses(tmp_path):
    cfg = PipelineConfig.from_folder(_write(tmp_path, ROUTE_PIPELINE))
    assert cfg.name == "route" and [s.name for s in cfg.steps] == ["embed", "intent", "answer"]


@pytest.mark.parametrize("text,error", [
    ("steps: []\n", "non-empty steps"),
    ("steps:\n  - {name: a, kind: dance}\n", "step 'a': kind 'dance'"),
    ("steps:\n  - {name: a, kind: embed}\n", "step 'a': needs a model"),
    ("steps:\n  - {name: a, kind: nearest, source: b, labels: {x: [y]}}\n",
     "step 'a': needs source"),
    ("steps:\n  - {name: g, kind: generate, model: m, template: '{later}'}\n",
     "step 'g': template uses {later}"),
    ("steps:\n  - {name: a, kind: embed, model: m, colour: red}\n", "step 1"),
    ("steps:\n  - {name: e, kind: embed, model: m}\n  - {name: h, kind: transcribe, model: w}\n",
     "step 'h': transcribe must be the first step"),
    ("steps:\n  - {name: h, kind: transcribe, model: w}\n  - {name: e, kind: embed, model: m}\n",
     "step 'e': the input is audio; name the text to embed with source"),
    ("steps:\n  - {name: h, kind: transcribe, model: w}\n"
     "  - {name: g, kind: generate, model: m, template: 'say {input}'}\n",
     "step 'g': the input is audio; the template names the transcribe step's text"),
])
def test_bad_pipeline_files_name_the_file_and_step(tmp_path, text, error):
    with pytest.raises(ValueError, match=error) as e:
        PipelineConfig.from_folder(_write(tmp_path, text))
    assert "pipeline.yaml" in str(e.value)


def test_a_missing_deployment_is_refused_at_load_naming_file_and_step(tmp_path):
    cfg = PipelineConfig.from_folder(_write(tmp_path, ROUTE_PIPELINE))

    class Host:
        deployments = {}

    with pytest.raises(ValueError, match=r"pipeline.yaml: step 'embed' uses model "
                                         r"'all-minilm-l6-v2', which is not loaded"):
        Pipeline(cfg, Host())


def test_recommend_retrieves_by_text_and_ranks_by_score(tmp_path):
    """retrieve takes the k nearest items; rank sends one sample an item (its features, its
    similarity last) in the recommender's layout and answers the best top_k, best first."""
    import asyncio
    import json

    import numpy as np

    items = catalogue(dlrm_config("small"))
    (tmp_path / "items.json").write_text(json.dumps(items))
    cfg = PipelineConfig.from_folder(_write(tmp_path, RECOMMEND_PIPELINE))
    assert [s.kind for s in cfg.steps] == ["embed", "retrieve", "rank"]
    names = [i["name"] for i in items]
    sent = {}

    class Ops:
        async def embed(self, model, texts):  # item i is axis i; the query is near 2, 5, 7
            if texts == names:
                return np.eye(len(names), 32)
            v = np.zeros(32)
            v[[2, 5, 7]] = [3.0, 2.0, 1.0]
            return v[None]

        async def score(self, model, dense, values, lengths):
            sent.update(dense=dense, values=values, lengths=lengths)
            return -dense[:, 0]  # the lowest first dense feature scores best

    class Host:
        deployments = {"all-minilm-l6-v2": type("D", (), {"kind": "encoder"}),
                       "dlrm-ranker": type("D", (), {"kind": "recommender"})}

    pipe = Pipeline(cfg, Host())
    ctx = asyncio.run(pipe.run("a query", Ops()))
    picked = [item for item, _ in ctx["candidates"]]
    assert [p[0] for p in picked[:3]] == [names[2], names[5], names[7]] and len(picked) == 8
    dense, values, lengths = sent["dense"], sent["values"], sent["lengths"]
    assert dense.shape == (8, 13) and lengths.shape == (26, 8)
    np.testing.assert_allclose(dense[:, :12], [p[2] for p in picked], rtol=1e-6)
    assert dense[0, 12] == pytest.approx(3 / np.sqrt(14))  # the similarity, last
    f0 = values[:int(lengths[0].sum())]  # feature 0 of each candidate, in order
    assert f0.tolist() == [i for p in picked for i in p[3][0]]
    best = sorted(range(8), key=lambda i: dense[i, 0])[:3]
    assert ctx["ranked"] == ", ".join(picked[i][0] for i in best)
    outs = dict(pipe.outputs(ctx))
    assert outs["candidates"].split(", ") == [p[0] for p in picked]


def test_the_assistant_transcribes_then_understands_and_answers(tmp_path):
    """The shipped assistant: audio in, the transcript embedded, its intent's template
    filled with the transcript; every step's output by name."""
    import asyncio

    import numpy as np

    cfg = PipelineConfig.from_folder(_write(tmp_path, ASSISTANT_PIPELINE))
    assert cfg.takes_audio and [s.kind for s in cfg.steps] == [
        "transcribe", "embed", "nearest", "generate"]
    calls = []

    class Ops:
        async def transcribe(self, model, audio, rate, language, max_tokens):
            calls.append(("transcribe", model, len(audio), rate, language, max_tokens))
            return "will it rain tomorrow"

        async def embed(self, model, texts):  # "rain" texts near axis 0, the rest axis 1
            return np.array([[1.0, 0.0] if "rain" in t else [0.0, 1.0] for t in texts])

        async def generate(self, model, prompt, max_tokens):
            calls.append(("generate", model, prompt))
            return "sunny"

    class Host:
        deployments = {}

    pipe = object.__new__(Pipeline)
    pipe.config, pipe.host, pipe._examples = cfg, Host(), {}
    ctx = asyncio.run(pipe.run((np.zeros(8000, np.float32), 8000), Ops()))
    assert calls[0] == ("transcribe", "whisper-tiny-random", 8000, 8000, "en", 48)
    assert ctx["heard"] == "will it rain tomorrow" and ctx["intent"] == "weather"
    assert calls[1] == ("generate", "demo-llama-random",
                        "The forecast, asked as 'will it rain tomorrow':")
    assert ctx["output"] == "sunny"
    assert dict(pipe.outputs(ctx)) == {"heard": "will it rain tomorrow", "intent": "weather",
                                       "answer": "sunny"}
