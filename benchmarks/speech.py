"""Transcription throughput, in seconds of audio per wall second, at concurrency 1 and 16:
shardserve's engine against transformers' generate on the same checkpoint, in one run.

    python benchmarks/speech.py [--size openai-tiny] [--clips 16] [--max-tokens 64]
                                [--served] [--out r.json]

Model: ``make-test-model --arch whisper --size openai-tiny`` (whisper-tiny's widths and
depths, random weights, float32; our 2,429-token vocabulary). Audio: ``--clips`` sentences
spoken by espeak-ng (22.05 kHz WAV, 1.5-3.5 s each). Every system makes exactly
``--max-tokens`` tokens a clip (a random Whisper never says <|endoftext|>), greedy, from the
same forced start tokens (language ``en`` given, so no system detects it), and goes from
audio to tokens (front end included):

- transformers: ``WhisperFeatureExtractor`` (after our resampler: it takes 16 kHz only) and
  the generic greedy ``generate`` (Whisper's own override adds long-form logic; for a
  30 s window they agree token for token), one clip at a time (concurrency 1) and the clips
  as one batch (concurrency 16), on both cores;
- shardserve offline: ``LLM.transcribe``, one clip a call (concurrency 1) and all clips in one
  call (continuous batching), at tp=1 (``cpu:1``, both cores) and tp=2 (``cpu:2``);
- ``--served``: the server at tp=1, the official ``openai`` client from 1 and 16 threads.

Goal (issue 16): >= 3x transformers at concurrency 16.

The run also measures this machine's float32 GEMM rate and memory read rate and prints the
ceiling they put on that ratio: at concurrency 16 no engine can take less than the
encoder's FLOPs for every window at the GEMM rate plus, for every decode step, reading each
sequence's cross-attention keys and values (float32) at the memory rate; transformers' time
over that floor bounds the speed-up any float32 engine could show in this run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shardserve import LLM, SamplingParams, test_models  # noqa: E402
from shardserve.audio import decode_wav, resample  # noqa: E402

SENTENCES = ["will it rain tomorrow in the mountains", "what time is it in Tokyo right now",
             "play some quiet music for the evening", "how far is the moon from the earth",
             "set an alarm for seven in the morning", "remind me to buy milk and bread",
             "what is the capital city of Australia", "turn off the lights in the kitchen",
             "tell me a short story about a dragon", "how do I make a cup of green tea",
             "call my sister when I get home tonight", "what will the weather be on Sunday",
             "translate good morning into French", "who wrote the novel War and Peace",
             "start a timer for twenty minutes", "is the museum open on public holidays"]


def clips(n: int, folder: Path) -> list[bytes]:
    out = []
    for i in range(n):
        path = folder / f"clip{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), SENTENCES[i % len(SENTENCES)]],
                       check=True, timeout=60)
        out.append(path.read_bytes())
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def machine_limits() -> dict:
    """Float32 GEMM FLOP/s (2048^3, both cores) and memory read bytes/s (a 1 GiB sum), best
    of five each, measured now."""
    torch.set_num_threads(2)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = max(2 * 2048 ** 3 / timed(lambda: a @ b) for _ in range(5))
    big = torch.ones(1 << 28)
    read = max(big.numel() * 4 / timed(big.sum) for _ in range(5))
    return {"gemm_gflops": gemm / 1e9, "read_gb_s": read / 1e9}


def ceiling(path: Path, clips: int, tokens: int, limits: dict, transformers_s: float) -> dict:
    """The floor on any float32 engine's time at concurrency 16 (see the module's text) and
    transformers' time over it."""
    from shardserve.config import ModelConfig

    spec = ModelConfig(str(path)).spec
    d, T = spec.hidden_size, spec.max_source_positions
    convs = 2 * (2 * T) * spec.num_mel_bins * d * 3 + 2 * T * d * d * 3
    layer = 2 * T * (4 * d * d + 2 * d * spec.encoder_ffn) + 4 * T * T * d  # + attention
    encoder = convs + spec.encoder_layers * layer
    cross = tokens * clips * spec.num_layers * 2 * T * d * 4
    floor = clips * encoder / (limits["gemm_gflops"] * 1e9) + cross / (limits["read_gb_s"] * 1e9)
    return {**limits, "encoder_gflop_per_window": encoder / 1e9,
            "cross_gb_read": cross / 1e9, "floor_s": floor,
            "ceiling_ratio": transformers_s / floor}


def transformers_runs(path: Path, wavs: list[bytes], prompt: list[int], max_tokens: int
                      ) -> tuple[dict, list[list[int]]]:
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.generation.utils import GenerationMixin

    torch.set_num_threads(2)
    hf = WhisperForConditionalGeneration.from_pretrained(str(path)).eval()
    fe = WhisperFeatureExtractor.from_pretrained(str(path))

    def run(batch: list[bytes]) -> list[list[int]]:
        audio = [resample(*decode_wav(w), 16000) for w in batch]
        feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
        with torch.inference_mode():
            out = GenerationMixin.generate(
                hf, input_features=feats, decoder_input_ids=torch.tensor([prompt] * len(batch)),
                max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        return out[:, len(prompt):].tolist()

    run(wavs[:1])  # warm-up
    tokens: list[list[int]] = []
    one = timed(lambda: [tokens.extend(run([w])) for w in wavs])
    batched = timed(lambda: run(wavs))
    return {"concurrency_1_s": one, "concurrency_16_s": batched}, tokens


def ours(path: Path, wavs: list[bytes], tp: int, max_tokens: int
         ) -> tuple[dict, list[list[int]], list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(str(path), tensor_parallel_size=tp, devices=f"cpu:{tp}", max_num_seqs=16) as llm:
        llm.transcribe(wavs[:1], "en", sampling_params=params)  # warm-up
        outs: list = []
        one = timed(lambda: [outs.extend(llm.transcribe(w, "en", sampling_params=params))
                             for w in wavs])
        batched = timed(lambda: llm.transcribe(wavs, "en", sampling_params=params))
    return ({"concurrency_1_s": one, "concurrency_16_s": batched},
            [o.outputs[0].token_ids for o in outs], outs[0].prompt_token_ids)


def served(path: Path, wavs: list[bytes], max_tokens: int) -> dict:
    import openai

    from benchmarks.serving import served as running
    from tests.e2e.test_server import _free_port

    port = _free_port()
    cmd = [sys.executable, "-m", "shardserve.cli.main", "serve", "--model", str(path),
           "--devices", "cpu:1", "--port", str(port), "--max-num-seqs", "16"]
    out = {}
    with running(cmd, f"http://127.0.0.1:{port}/v2/health/ready"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")

        def one(w: bytes) -> str:
            return client.audio.transcriptions.create(
                model=path.name, file=("a.wav", w), language="en",
                extra_body={"max_tokens": max_tokens}).text
        one(wavs[0])
        for c in (1, 16):
            with ThreadPoolExecutor(c) as pool:
                out[f"concurrency_{c}_s"] = timed(lambda pool=pool: list(pool.map(one, wavs)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="openai-tiny")
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--served", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = test_models.write(Path(tmp) / f"whisper-{args.size}", "whisper", args.size)
        wavs = clips(args.clips, Path(tmp))
        seconds = sum(len(decode_wav(w)[0]) / decode_wav(w)[1] for w in wavs)
        result: dict = {"clips": args.clips, "audio_seconds": seconds,
                        "tokens_per_clip": args.max_tokens}
        ref_tokens = None
        for tp in (1, 2):
            times, tokens, prompt = ours(path, wavs, tp, args.max_tokens)
            result[f"shardserve_tp{tp}"] = times
            ref_tokens = ref_tokens or tokens
        result["transformers"], hf_tokens = transformers_runs(path, wavs, prompt,
                                                              args.max_tokens)
        # equal up to the first <|endoftext|>: past it transformers (min_new_tokens) takes the
        # next best token, we (ignore_eos) keep it and go on
        eos = json.loads((path / "config.json").read_text())["eos_token_id"]
        cut = [t.index(eos) if eos in t else len(t) for t in ref_tokens]
        same = [a[:n] == b[:n] for a, b, n in zip(hf_tokens, ref_tokens, cut, strict=True)]
        result["same_tokens_as_transformers"] = all(same)
        result["clips_with_the_same_tokens"] = sum(same)
        result["clips_where_eos_came"] = sum(n < args.max_tokens for n in cut)
        if args.served:
            result["shardserve_served_tp1"] = served(path, wavs, args.max_tokens)
        result["ceiling"] = ceiling(path, args.clips, args.max_tokens, machine_limits(),
                                    result["transformers"]["concurrency_16_s"])
    print(json.dumps(result, indent=2))
    print()
    print("| system | audio s / wall s at concurrency 1 | at concurrency 16 |")
    print("|---|---|---|")
    for key in ("transformers", "shardserve_tp1", "shardserve_tp2", "shardserve_served_tp1"):
        if key in result:
            r = result[key]
            print(f"| {key} | {seconds / r['concurrency_1_s']:.1f} | "
                  f"{seconds / r['concurrency_16_s']:.1f} |")
    hf = result["transformers"]["concurrency_16_s"]
    best = min(result[k]["concurrency_16_s"] for k in ("shardserve_tp1", "shardserve_tp2"))
    print(f"\nat concurrency 16: shardserve {hf / best:.2f}x transformers (goal >= 3x); "
          f"clips with the same greedy tokens: {result['clips_with_the_same_tokens']}/"
          f"{args.clips} (random weights: a near-tie can split the two float32 runs)")
    c = result["ceiling"]
    print(f"ceiling on this machine: float32 GEMM {c['gemm_gflops']:.0f} GFLOP/s, memory "
          f"{c['read_gb_s']:.1f} GB/s; {args.clips} windows of {c['encoder_gflop_per_window']:.1f}"
          f" GFLOP and {c['cross_gb_read']:.1f} GB of cross-attention reads take at least "
          f"{c['floor_s']:.2f} s: at most {c['ceiling_ratio']:.2f}x transformers for any "
          "float32 engine")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
