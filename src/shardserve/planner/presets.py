"""Model shapes from published configurations, for planning models one does not have on
disk (``shardserve plan --model llama-2-70b``). Sizes only: the planner needs no weights.

- ``opt-175b`` is the GPT-3 175B shape (96 layers, hidden 12288, 96 heads, a plain MLP of
  49152 without a gate: ``gated_mlp`` False). Its biases and 2048 learned positions (25M of
  175B) are left out.
- ``mixtral-8x7b`` is stated as its dense equivalent in memory: every expert is held, so an
  intermediate size of 8 x 14336 (the eight experts' parameters); its compute per token is
  two experts', which a cost model must not take from this figure.
"""

from __future__ import annotations

import dataclasses

from shardserve.planner.specs import TransformerSpec

_LLAMA = {"architectures": ["LlamaForCausalLM"], "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "torch_dtype": "bfloat16"}

PRESETS: dict[str, dict] = {
    # facebook/opt-175b (metaseq), GPT-3 175B's published shape
    "opt-175b": {**_LLAMA, "architectures": ["OPTForCausalLM"],
                 "hidden_size": 12288, "num_hidden_layers": 96,
                 "num_attention_heads": 96, "num_key_value_heads": 96,
                 "intermediate_size": 49152, "vocab_size": 50272,
                 "max_position_embeddings": 2048, "tie_word_embeddings": True},
    # meta-llama/Llama-2-70b-hf config.json
    "llama-2-70b": {**_LLAMA, "hidden_size": 8192, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8,
                    "intermediate_size": 28672, "vocab_size": 32000,
                    "max_position_embeddings": 4096},
    # meta-llama/Meta-Llama-3-8B config.json
    "llama-3-8b": {**_LLAMA, "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8,
                   "intermediate_size": 14336, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0},
    # mistralai/Mixtral-8x7B-v0.1 config.json (8 experts of 14336, dense-equivalent memory)
    "mixtral-8x7b": {**_LLAMA, "architectures": ["MixtralForCausalLM"],
                     "hidden_size": 4096, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8,
                     "intermediate_size": 8 * 14336, "vocab_size": 32000,
                     "max_position_embeddings": 32768, "rope_theta": 1e6},
}


def preset(name: str) -> TransformerSpec:
    if name not in PRESETS:
        raise ValueError(f"no model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    spec = TransformerSpec.from_hf(PRESETS[name])
    return dataclasses.replace(spec, gated_mlp=False) if name == "opt-175b" else spec
