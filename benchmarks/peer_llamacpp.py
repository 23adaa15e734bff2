"""llama.cpp at batch 1 on our workload B, for benchmarks/throughput.py: run with the peer
venv's Python (``make peer-llamacpp`` builds benchmarks/.venv-llamacpp: llama-cpp-python built
for this CPU with ``-DGGML_NATIVE=ON`` less AMX int8, whose q8_0 path crashes on the AMX
machines, and the ``gguf`` package), never ours.

Writes our float32 test checkpoint (a Llama-family folder of config.json + safetensors) as
GGUF with the ``gguf`` package's writer, in f32, bf16 (rounded to nearest even, as
``Tensor.bfloat16`` rounds our bfloat16 checkpoint: the same weights) or q8_0 (llama.cpp's own
8-bit blocks), with q and k permuted to llama.cpp's rotary layout as its converter does and a
placeholder vocabulary (token ids go in and out; no text). Then runs B's prompt, greedy, 128
tokens with EOS ignored, and prints one JSON line: seconds end to end, time to the first
token, per-token decode time, and the first 16 token ids.

    benchmarks/.venv-llamacpp/bin/python benchmarks/peer_llamacpp.py --model DIR \\
        --ftype bf16 --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

_here = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
_spec = importlib.util.spec_from_file_location("workloads", _here / "workloads.py")
_workloads = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_workloads)

FTYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
          "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
          "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _rope_layout(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows to the interleaved pairs llama.cpp's rope expects."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model: Path, out: Path, ftype: str) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    if cfg.get("architectures", [""])[0] != "LlamaForCausalLM":
        raise SystemExit(f"{model}: only LlamaForCausalLM checkpoints are converted here")
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv, vocab = cfg.get("num_key_value_heads", nh), cfg["vocab_size"]
    qtype, file_type = FTYPES[ftype]
    path = out / f"{model.name}-{ftype}.gguf"
    if path.is_file() and path.stat().st_mtime >= max(
            f.stat().st_mtime for f in model.iterdir()):  # written from this checkpoint
        return path
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(model.name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(h // nh)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(vocab)
    w.add_file_type(file_type)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    types = [gguf.TokenType.NORMAL] * vocab
    bos, eos = cfg.get("bos_token_id", 1), cfg.get("eos_token_id", 2)
    types[bos] = types[eos] = gguf.TokenType.CONTROL
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(model.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    for name, t in sorted(tensors.items()):
        t = t.astype(np.float32)
        if name == "model.embed_tokens.weight":
            new = "token_embd.weight"
        elif name == "lm_head.weight":
            new = "output.weight"
        elif name == "model.norm.weight":
            new = "output_norm.weight"
        else:
            _, _, i, *rest = name.split(".")
            new = f"blk.{i}.{LAYER['.'.join(rest[:-1])]}.weight"
            if rest[-2] == "q_proj":
                t = _rope_layout(t, nh)
            elif rest[-2] == "k_proj":
                t = _rope_layout(t, nkv)
        if t.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(new, t)  # norms stay float32, as llama.cpp's converter keeps them
        else:
            w.add_tensor(new, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a float32 Llama checkpoint folder")
    ap.add_argument("--ftype", default="bf16", choices=sorted(FTYPES))
    ap.add_argument("--out", required=True, help="where the .gguf is written")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    path = write_gguf(Path(args.model), Path(args.out), args.ftype)
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    (prompt,), (n_out,) = _workloads.workload("B")

    def run(tokens: list[int], n: int) -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        first, out = 0.0, []
        for tok in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
            out.append(tok)
            if len(out) == 1:
                first = time.perf_counter() - t0
            if len(out) == n:
                break
        return time.perf_counter() - t0, first, out

    run(prompt, 8)  # warm up, as throughput.py does for its own engine
    seconds, first, tokens = run(prompt, n_out)
    # a whole prefill each: generate(reset=True) keeps the context's common prefix, and these
    # prompts share none with it or each other (workloads.cold_prompts)
    ttft = statistics.median(run(p, 1)[1] for p in _workloads.cold_prompts(prompt, 5))
    print("PEER " + json.dumps({
        "workload": "B", "ftype": args.ftype, "seconds": seconds, "tokens": len(tokens),
        "ttft_s": ttft, "decode_ms_per_token": 1e3 * (seconds - first) / (len(tokens) - 1),
        "greedy": tokens[:16]}), flush=True)


if __name__ == "__main__":
    main()
