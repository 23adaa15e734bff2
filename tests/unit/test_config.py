import json

import pytest
import torch
from safetensors.torch import save_file

from shardserve import LLM, SamplingParams, test_models
from shardserve.config import DeviceConfig, ModelConfig, ParallelConfig
from shardserve.planner.specs import RopeSpec


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        ModelConfig(str(tmp_path))


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ModelConfig(str(tmp_path / "nope"))


def test_pickle_only_checkpoint_is_refused_with_conversion_hint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(test_models.hf_config("llama", "tiny")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors only.*save_pretrained"):
        ModelConfig(str(tmp_path))


def test_unsupported_architecture_lists_supported(tmp_path):
    cfg = test_models.hf_config("llama", "tiny") | {"architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_tp_that_does_not_divide_heads(checkpoints):
    spec = ModelConfig(str(checkpoints["llama"])).spec
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide.*\[1, 2, 4\]"):
        ParallelConfig(3).check_model(spec)
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        LLM(str(checkpoints["llama"]), tensor_parallel_size=3)


def test_budget_string_that_does_not_parse():
    with pytest.raises(ValueError, match="cannot read '2 gigs' as a size"):
        DeviceConfig("cpu:2", "2 gigs")


def test_bad_devices_string(checkpoints):
    with pytest.raises(ValueError, match="expected cpu:N or cuda"):
        LLM(str(checkpoints["llama"]), devices="tpu:2")
    with pytest.raises(ValueError, match="needs 2 devices"):
        LLM(str(checkpoints["llama"]), tensor_parallel_size=2, devices="cpu:1")


def test_bad_dtype_and_max_model_len(checkpoints):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported.*quantization"):
        ModelConfig(str(checkpoints["llama"]), dtype="int8")
    with pytest.raises(ValueError, match="quantization 'fp8' is not supported"):
        ModelConfig(str(checkpoints["llama"]), quantization="fp8")
    with pytest.raises(ValueError, match="max_model_len=99999"):
        ModelConfig(str(checkpoints["llama"]), max_model_len=99999)


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k": -2}, "top_k"), ({"seed": "x"}, "seed"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_rope_parameters_in_v4_and_v5_spelling_agree():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    v4 = RopeSpec.from_hf({"rope_theta": 5e5, "rope_scaling": scaling})
    v5 = RopeSpec.from_hf({"rope_parameters": {"rope_theta": 5e5, **scaling}})
    assert v4 == v5 and v4.rope_type == "llama3" and v4.theta == 5e5
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        RopeSpec.from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("line,error", [
    ("tenants: acme", "tenants must be a list of tenant names"),
    ("tenants: [acme, 3]", "tenants must be a list"),
    ("preferred_batch_sizes: 8", "preferred_batch_sizes must be a list"),
    ("tp: true", "tp must be an integer"), ("max_restarts: -1", "max_restarts must be"),
    ("step_timeout_s: 0", "step_timeout_s must be"), ("name: a/b", "name must be"),
    ("quantization: int4", "quantization 'int4' is not supported; use one of \\['int8'\\]"),
    ("quantization: 8", "quantization must be a string"),
])
def test_model_yaml_fields_have_their_types(tmp_path, checkpoints, line, error):
    from shardserve.config import DeploymentConfig

    (tmp_path / "model.yaml").write_text(f"weights: {checkpoints['llama']}\n{line}\n")
    with pytest.raises(ValueError, match=error) as e:
        DeploymentConfig.from_folder(str(tmp_path))
    assert "model.yaml" in str(e.value)


def test_int8_is_refused_where_it_would_not_run_natively(checkpoints, monkeypatch):
    from shardserve import kernels
    from shardserve.runtime.precision import choose

    llama = ModelConfig(str(checkpoints["llama"]), quantization="int8")
    with pytest.raises(ValueError, match="applies to generative models"):
        choose(ModelConfig(str(checkpoints["bert"]), quantization="int8"), "cpu")
    with pytest.raises(ValueError, match="native CPU kernels.*cuda"):
        choose(llama, "cuda")
    monkeypatch.setattr(kernels, "status", lambda: (False, "no C compiler (cc)"))
    with pytest.raises(ValueError, match="no C compiler"):
        choose(llama, "cpu")
    monkeypatch.undo()
    if kernels.status()[0]:
        p = choose(llama, "cpu")
        assert (p.label, p.quantization) == ("native-int8/float32", "int8")
        assert "int8" in p.note and "per output feature" in p.note


def test_serve_takes_the_engine_flags_vllm_users_type():
    from shardserve.cli.main import _build, _parser
    from shardserve.config import CacheConfig, DeploymentConfig, SchedulerConfig

    args = _parser().parse_args([
        "serve", "--model", "m", "--served-model-name", "x", "--tensor-parallel-size", "2",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--block-size", "32",
        "--no-enable-prefix-caching", "--dtype", "bfloat16", "--max-model-len", "300"])
    args.path = "m"
    cfg = _build(DeploymentConfig, args)
    assert (cfg.name, cfg.tp, cfg.dtype, cfg.max_model_len) == ("x", 2, "bfloat16", 300)
    assert cfg.cache_config() == CacheConfig(32, None, False)
    assert cfg.scheduler_config() == SchedulerConfig(8, 512)
