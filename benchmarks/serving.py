"""shardserve's OpenAI server against vLLM's, driven by vLLM's own serving benchmark client, and
each server against its own offline engine, in one run.

    python benchmarks/serving.py [--concurrency 1,8,64] [--no-vllm]

Model: llama-110m shape, random weights, float32, with the test BPE tokenizer. Workload as
``vllm bench serve`` runs it: random prompts of 128 tokens, 128 output tokens (ignore_eos),
streamed completions; 64 requests at concurrency 64 and 8, 8 at concurrency 1. Each server
runs as its own process on loopback with every core of this machine (shardserve: ``--devices
cpu:1``, the one worker on all cores; vLLM: its CPU backend bound to all cores, none reserved)
and max_num_seqs 64; the client (benchmarks/vllm_client.py, in the peer venv that
``make peers`` builds) is the same for both. The offline figure is ``LLM.generate`` on 64
prompts the client sends at concurrency 64 (text, tokenized as the server does), 128 tokens
out, in this process, with the same engine settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shardserve import LLM, SamplingParams, test_models  # noqa: E402
from tests.e2e.test_server import _free_port  # noqa: E402

PEER = ROOT / "benchmarks" / ".venv-vllm" / "bin" / "python"
IN, OUT = 128, 128


@contextlib.contextmanager
def served(cmd: list[str], health_url: str, env: dict | None = None, cwd: Path = ROOT):
    """A server started with ``cmd``, ready (``health_url`` answers 200) inside the block,
    stopped after it. Its output goes to our stderr."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=sys.stderr, stderr=sys.stderr)
    try:
        _wait(health_url, proc)
        yield
    finally:
        _stop(proc)


def _wait(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def client(port: int, tokenizer: Path, args: list[str], dump: Path | None = None) -> dict:
    """vLLM's serving benchmark against the server on ``port`` with ``args`` (backend,
    endpoint, model, dataset, load); its summary, or with ``dump`` the prompts it would
    send, written there."""
    cmd = [str(PEER), str(ROOT / "benchmarks" / "vllm_client.py"),
           "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", str(tokenizer),
           "--disable-tqdm", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if dump is not None:
        subprocess.run(cmd + ["--dump-prompts", str(dump)], check=True, env=env,
                       capture_output=True, timeout=600)
        return {}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the client failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def _client(port: int, tokenizer: Path, requests: int, concurrency: int, seed: int,
            dump: Path | None = None) -> dict:
    return client(port, tokenizer, [
        "--backend", "openai", "--endpoint", "/v1/completions", "--model", "m",
        "--dataset-name", "random", "--random-input-len", str(IN),
        "--random-output-len", str(OUT), "--ignore-eos", "--num-prompts", str(requests),
        "--max-concurrency", str(concurrency), "--seed", str(seed)], dump)


def _runs(port: int, tokenizer: Path, loads: list[int]) -> dict:
    """Each load with prompts of its own (seed = concurrency): no run hits the prefix cache
    that an earlier one filled."""
    _client(port, tokenizer, 4, 4, seed=12345)  # warm up
    return {c: _client(port, tokenizer, 8 if c == 1 else 64, c, seed=c) for c in loads}


def _shardserve(path: Path, loads: list[int], devices: str) -> dict:
    port = _free_port()
    with served([str(Path(sys.executable).parent / "shardserve"), "serve", "--model",
                 str(path), "--name", "m", "--devices", devices, "--max-num-seqs", "64",
                 "--max-model-len", "1024", "--port", str(port)],
                f"http://127.0.0.1:{port}/v2/health/ready"):
        return _runs(port, path, loads)


def _vllm(path: Path, loads: list[int]) -> dict:
    port = _free_port()
    cores = len(os.sched_getaffinity(0))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND=f"0-{cores-1}",
               VLLM_CPU_NUM_OF_RESERVED_CPU="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with served([str(PEER), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
                 "--served-model-name", "m", "--dtype", "float32", "--max-model-len", "1024",
                 "--max-num-seqs", "64", "--host", "127.0.0.1", "--port", str(port)],
                f"http://127.0.0.1:{port}/health", env, Path("/")):
        return _runs(port, path, loads)


def _offline(path: Path, devices: str) -> float:
    """Output tokens per second of ``LLM.generate`` on the prompts the client sends at
    concurrency 64 (its random dataset, seed 64: text, tokenized here as the server does)."""
    dump = Path(tempfile.mkdtemp()) / "prompts.json"
    _client(0, path, 64, 64, 64, dump)
    prompts = json.loads(dump.read_text())
    params = SamplingParams(max_tokens=OUT, temperature=0, ignore_eos=True)
    with LLM(str(path), devices=devices, max_num_seqs=64, max_model_len=1024) as llm:
        llm.generate(prompts[:4], params)  # warm up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--devices", default="cpu:1")
    ap.add_argument("--no-vllm", action="store_true", help="shardserve only")
    ap.add_argument("--out", default=str(Path(__file__).parent / ".cache"))
    args = ap.parse_args()
    loads = [int(c) for c in args.concurrency.split(",")]
    path = Path(args.out) / "llama-110m-random-f32-tok"
    if not (path / "config.json").is_file():
        test_models.write(path, "llama", "llama-110m", seed=0)
    offline = _offline(path, args.devices)
    ours = _shardserve(path, loads, args.devices)
    peer = {} if args.no_vllm else _vllm(path, loads)
    report = {"offline_output_tok_s": round(offline, 1), "loads": {}}
    for c in loads:
        row = {"shardserve": ours[c]}
        if peer:
            row["vllm"] = peer[c]
            row["served_ratio_vs_vllm"] = round(ours[c]["output_throughput"] /
                                                peer[c]["output_throughput"], 3)
        if c == 64:  # the offline run's batch
            row["served_over_offline"] = round(ours[c]["output_throughput"] / offline, 3)
        report["loads"][c] = row
    text = json.dumps(report, indent=2)
    (Path(args.out) / f"serving-{args.devices.replace(':', '')}.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
