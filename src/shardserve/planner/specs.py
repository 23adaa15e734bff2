"""Specs the planner reasons about, read from a Hugging Face ``config.json`` alone (no weights).

The model files build their modules from the same spec, so the planner's byte counts and the
bytes a worker actually allocates come from one description of the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Weight-only quantizations: bytes per quantized weight (each output feature also keeps a
# float32 scale). The linear layers and the LM head are quantized; embeddings (untied) and
# vectors are not.
QUANTIZATION_BYTES = {"int8": 1}


def check_quantization(name: str | None) -> None:
    if name is not None and name not in QUANTIZATION_BYTES:
        raise ValueError(f"quantization {name!r} is not supported; use one of "
                         f"{sorted(QUANTIZATION_BYTES)} or leave it unset")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16"}


def canonical_dtype(name: str) -> str:
    """``"bf16"`` -> ``"bfloat16"``; raises ``ValueError`` for dtypes we do not serve."""
    name = _DTYPE_ALIASES.get(name, name).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        hint = (f"; for {name} weights keep dtype and set quantization: {name}"
                if name in QUANTIZATION_BYTES else "")
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(DTYPE_BYTES)}"
                         f"{hint}")
    return name


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters, normalised from either transformers v4 or v5 keys."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> RopeSpec:
        params = dict(hf.get("rope_parameters") or {})  # transformers v5
        scaling = hf.get("rope_scaling") or {}  # transformers v4
        params.update({k: v for k, v in scaling.items() if v is not None})
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                             "supported: 'default', 'llama3'")
        if rope_type == "default":
            return RopeSpec(theta=float(theta))
        return RopeSpec(
            theta=float(theta), rope_type=rope_type, factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class TransformerSpec:
    """A decoder-only transformer of the Llama family, as far as sizes and shapes go."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool
    sliding_windows: tuple[int | None, ...]  # one per layer; None = full attention
    dtype: str  # the checkpoint's dtype
    eos_token_ids: tuple[int, ...]
    gated_mlp: bool = True  # Llama's gate/up/down; False: up/down only (planning presets)

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> TransformerSpec:
        try:
            arch = hf["architectures"][0]
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            layers = int(hf["num_hidden_layers"])
            spec = TransformerSpec(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                intermediate_size=int(hf["intermediate_size"]),
                max_position=int(hf.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=RopeSpec.from_hf(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
                sliding_windows=_sliding_windows(hf, arch, layers),
                dtype=canonical_dtype(str(hf.get("torch_dtype") or hf.get("dtype") or "float32")),
                eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) is not a multiple of "
                             f"num_key_value_heads ({spec.num_kv_heads})")
        return spec

    def tp_ok(self, tp: int) -> bool:
        """Whether heads and MLP split evenly over ``tp`` ranks (KV heads may replicate)."""
        kv = self.num_kv_heads
        kv_ok = kv % tp == 0 if tp <= kv else tp % kv == 0
        return self.num_heads % tp == 0 and kv_ok and self.intermediate_size % tp == 0


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _sliding_windows(hf: dict[str, Any], arch: str, layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if arch == "Qwen2ForCausalLM":
        # Qwen2 slides only when asked, and only from max_window_layers on (as transformers does).
        if not hf.get("use_sliding_window", False) or window is None:
            return (None,) * layers
        first = int(hf.get("max_window_layers", layers))
        return tuple(int(window) if i >= first else None for i in range(layers))
    if arch == "LlamaForCausalLM":
        return (None,) * layers
    return (int(window) if window else None,) * layers


ENCODER_ARCHITECTURES = ("BertModel", "BertForSequenceClassification")


@dataclass(frozen=True)
class EncoderSpec:
    """A BERT-family encoder, as far as sizes and shapes go."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    type_vocab_size: int
    layer_norm_eps: float
    num_labels: int  # 0 for a plain encoder
    dtype: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> EncoderSpec:
        arch = hf["architectures"][0]
        try:
            labels = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
            return EncoderSpec(
                architecture=arch, vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
                num_heads=int(hf["num_attention_heads"]),
                intermediate_size=int(hf["intermediate_size"]),
                max_position=int(hf.get("max_position_embeddings", 512)),
                type_vocab_size=int(hf.get("type_vocab_size", 2)),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                num_labels=labels if arch == "BertForSequenceClassification" else 0,
                dtype=canonical_dtype(str(hf.get("torch_dtype") or hf.get("dtype")
                                          or "float32")))
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None

    def tp_ok(self, tp: int) -> bool:
        return self.num_heads % tp == 0 and self.intermediate_size % tp == 0


@dataclass(frozen=True)
class DLRMSpec:
    """A DLRM recommendation model (TorchRec's layout): dense features through a bottom MLP,
    one embedding table a sparse feature pooled by sum or mean, pairwise dot interactions,
    a top MLP, a sigmoid. ``config.json``: ``dense_in_features``, ``embedding_dim``,
    ``num_embeddings_per_feature`` (rows of each table), ``dense_arch_layer_sizes`` (the
    last equals ``embedding_dim``), ``over_arch_layer_sizes`` (the last is 1), ``pooling``."""

    architecture: str
    dense_in_features: int
    embedding_dim: int
    num_embeddings: tuple[int, ...]  # rows of each table, one table a sparse feature
    dense_layers: tuple[int, ...]
    over_layers: tuple[int, ...]
    pooling: str  # "sum" or "mean"
    dtype: str
    max_position: int = 1  # no sequence: one sample is one row
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_tables(self) -> int:
        return len(self.num_embeddings)

    @property
    def num_layers(self) -> int:
        """Linear layers (the pipeline machinery counts stages over them; DLRM has one)."""
        return len(self.dense_layers) + len(self.over_layers)

    @property
    def over_in_features(self) -> int:
        f = self.num_tables + 1
        return self.embedding_dim + f * (f - 1) // 2

    def mlp_shapes(self) -> list[tuple[str, int, int]]:
        """``(checkpoint prefix, in, out)`` of every linear layer, TorchRec's names."""
        out, width = [], self.dense_in_features
        for i, n in enumerate(self.dense_layers):
            out.append((f"dense_arch.model._mlp.{i}._linear", width, n))
            width = n
        width = self.over_in_features
        for i, n in enumerate(self.over_layers[:-1]):
            out.append((f"over_arch.model.0._mlp.{i}._linear", width, n))
            width = n
        out.append(("over_arch.model.1", width, self.over_layers[-1]))
        return out

    @staticmethod
    def table_name(f: int) -> str:
        return f"sparse_arch.embedding_bag_collection.embedding_bags.t_cat_{f}.weight"

    def tp_ok(self, tp: int) -> bool:
        return tp >= 1

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> DLRMSpec:
        try:
            spec = DLRMSpec(
                architecture=hf["architectures"][0],
                dense_in_features=int(hf["dense_in_features"]),
                embedding_dim=int(hf["embedding_dim"]),
                num_embeddings=tuple(int(n) for n in hf["num_embeddings_per_feature"]),
                dense_layers=tuple(int(n) for n in hf["dense_arch_layer_sizes"]),
                over_layers=tuple(int(n) for n in hf["over_arch_layer_sizes"]),
                pooling=str(hf.get("pooling", "sum")),
                dtype=canonical_dtype(str(hf.get("torch_dtype") or "float32")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"config.json of a DLRM lacks or garbles a field: {e}") from None
        if not spec.num_embeddings or min(spec.num_embeddings) < 1:
            raise ValueError("config.json: num_embeddings_per_feature must list each table's "
                             "rows (>= 1)")
        if not spec.dense_layers or spec.dense_layers[-1] != spec.embedding_dim:
            raise ValueError(f"config.json: the last of dense_arch_layer_sizes "
                             f"{list(spec.dense_layers)} must equal embedding_dim "
                             f"{spec.embedding_dim} (the interaction dots them)")
        if not spec.over_layers or spec.over_layers[-1] != 1:
            raise ValueError("config.json: over_arch_layer_sizes must end in 1 (one logit)")
        if spec.pooling not in ("sum", "mean"):
            raise ValueError(f"config.json: pooling {spec.pooling!r}: use sum or mean")
        return spec


RECOMMENDER_ARCHITECTURES = ("DLRM",)
SPEECH_ARCHITECTURES = ("WhisperForConditionalGeneration",)


@dataclass(frozen=True)
class WhisperSpec(TransformerSpec):
    """Whisper: an audio encoder (two convolutions over log-mel frames, then a transformer)
    and a text decoder with self-attention over its tokens (the paged KV cache) and
    cross-attention over the encoder's states (a cache per sequence). The decoder's sizes
    are the ``TransformerSpec`` fields (``num_layers``, ``num_heads``, ``intermediate_size``,
    ``max_position`` = 448 target positions), so the decoder's KV cache is planned as an
    LLM's; the encoder's are their own."""

    encoder_layers: int = 0
    encoder_heads: int = 0
    encoder_ffn: int = 0
    num_mel_bins: int = 80
    max_source_positions: int = 1500  # encoder states a window of audio gives
    decoder_start_token_id: int = 0
    scale_embedding: bool = False

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> WhisperSpec:
        try:
            d, heads = int(hf["d_model"]), int(hf["decoder_attention_heads"])
            layers = int(hf["decoder_layers"])
            spec = WhisperSpec(
                architecture=hf["architectures"][0], vocab_size=int(hf["vocab_size"]),
                hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                head_dim=d // heads, intermediate_size=int(hf["decoder_ffn_dim"]),
                max_position=int(hf.get("max_target_positions", 448)), rms_norm_eps=1e-5,
                rope=RopeSpec(), tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
                qkv_bias=True, sliding_windows=(None,) * layers,
                dtype=canonical_dtype(str(hf.get("torch_dtype") or hf.get("dtype")
                                          or "float32")),
                eos_token_ids=_as_tuple(hf.get("eos_token_id")), gated_mlp=False,
                encoder_layers=int(hf["encoder_layers"]),
                encoder_heads=int(hf["encoder_attention_heads"]),
                encoder_ffn=int(hf["encoder_ffn_dim"]),
                num_mel_bins=int(hf.get("num_mel_bins", 80)),
                max_source_positions=int(hf.get("max_source_positions", 1500)),
                decoder_start_token_id=int(hf["decoder_start_token_id"]),
                scale_embedding=bool(hf.get("scale_embedding", False)))
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None
        if hf.get("activation_function", "gelu") != "gelu":
            raise ValueError(f"Whisper with activation {hf['activation_function']!r} is not "
                             "supported; supported: 'gelu'")
        if d % heads or d % spec.encoder_heads:
            raise ValueError(f"d_model ({d}) is not a multiple of the attention heads")
        return spec

    def tp_ok(self, tp: int) -> bool:
        return (self.num_heads % tp == 0 and self.encoder_heads % tp == 0
                and self.intermediate_size % tp == 0 and self.encoder_ffn % tp == 0)

    @property
    def encoder_frames(self) -> int:
        """Log-mel frames of one window (the first convolution's input)."""
        return 2 * self.max_source_positions

    @property
    def cross_blocks(self) -> tuple[int, int]:
        """``(blocks, rows a block)`` of one sequence's cross-attention keys (or values) in the
        cache: the encoder's states in equal blocks of at most 256 (what the paged attention
        kernel reads), 6 of 250 for Whisper's 1500."""
        t = self.max_source_positions
        blocks = -(-t // 256)
        return blocks, -(-t // blocks)


def spec_from_hf(hf: dict[str, Any]) -> TransformerSpec | EncoderSpec | DLRMSpec:
    """The spec of whatever family ``config.json`` describes."""
    if hf["architectures"][0] in ENCODER_ARCHITECTURES:
        return EncoderSpec.from_hf(hf)
    if hf["architectures"][0] in RECOMMENDER_ARCHITECTURES:
        return DLRMSpec.from_hf(hf)
    if hf["architectures"][0] in SPEECH_ARCHITECTURES:
        return WhisperSpec.from_hf(hf)
    return TransformerSpec.from_hf(hf)
