"""``architectures[0]`` of a Hugging Face ``config.json`` -> the class that implements it."""

from __future__ import annotations

import importlib

# name -> (module, class); modules import lazily so the registry costs nothing to consult.
_MODELS = {
    "LlamaForCausalLM": ("shardserve.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("shardserve.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("shardserve.models.llama", "LlamaForCausalLM"),
    "BertModel": ("shardserve.models.bert", "BertModel"),
    "BertForSequenceClassification": ("shardserve.models.bert",
                                      "BertForSequenceClassification"),
    "DLRM": ("shardserve.models.dlrm", "DLRM"),
    "WhisperForConditionalGeneration": ("shardserve.models.whisper",
                                        "WhisperForConditionalGeneration"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def check_architecture(arch: str) -> None:
    if arch not in _MODELS:
        raise ValueError(f"architecture {arch!r} is not supported; supported: "
                         f"{', '.join(supported_architectures())}")


def model_class(arch: str) -> type:
    check_architecture(arch)
    module, name = _MODELS[arch]
    return getattr(importlib.import_module(module), name)
