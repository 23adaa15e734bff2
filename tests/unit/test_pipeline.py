import pytest

from shardserve.engine.pipeline import Pipeline, PipelineConfig
from shardserve.test_models import ROUTE_PIPELINE


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
