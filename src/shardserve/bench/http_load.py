"""``shardserve bench``: a streaming load generator for the OpenAI completions endpoint.

Requests arrive as a Poisson process at ``--rate`` per second, or keep ``--concurrency`` in
flight; each streams, and the client records time to first token (TTFT), inter-token
latencies (ITL, per streamed chunk, divided among the tokens it carried), time per output
token after the first (TPOT) and end-to-end latency. Bounded: ``--num-requests`` requests and a
per-request timeout; the target must be a loopback address unless ``--allow-remote``.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import numpy as np


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_prompts(n: int, words: int, seed: int = 0) -> list[str]:
    """The bench's prompts: ``words`` words each, from a seeded generator."""
    rng = random.Random(seed)
    vocab = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
             "servers", "answer"]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def one_request(url: str, body: dict, api_key: str | None, timeout: float) -> Result:
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        r = conn.getresponse()
        if r.status != 200:
            return Result(False, error=f"HTTP {r.status}: {r.read()[:200]!r}")
        res, last = Result(True), None
        while line := r.readline():
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):  # a chunk per step that made tokens
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
        res.e2e = time.perf_counter() - t0
        return res
    except OSError as e:
        return Result(False, error=repr(e))
    finally:
        conn.close()


def run(url: str, model: str, num_requests: int, rate: float | None = None,
        concurrency: int | None = None, prompt_len: int = 64, max_tokens: int = 64,
        seed: int = 0, api_key: str | None = None, timeout: float = 600,
        allow_remote: bool = False) -> dict:
    """Send the load and summarise it (see the module doc)."""
    if not allow_remote and not _is_loopback(urlparse(url).hostname or ""):
        raise ValueError(f"{url} is not a loopback address; pass --allow-remote to load it")
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of --rate and --concurrency")
    rng = random.Random(seed)
    bodies = [{"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
              for p in make_prompts(num_requests, prompt_len, seed)]
    workers = concurrency or min(num_requests, 256)
    results: list[Result] = []
    lock = threading.Lock()

    def task(body: dict) -> None:
        r = one_request(url, body, api_key, timeout)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        next_at = t0
        for body in bodies:
            if rate is not None:  # Poisson arrivals: exponential gaps
                next_at += rng.expovariate(rate)
                time.sleep(max(0.0, next_at - time.perf_counter()))
            pool.submit(task, body)
    duration = time.perf_counter() - t0
    return summarise(results, duration, {"url": url, "model": model, "rate": rate,
                                         "concurrency": concurrency,
                                         "num_requests": num_requests,
                                         "prompt_words": prompt_len, "max_tokens": max_tokens})


def summarise(results: list[Result], duration: float, setup: dict) -> dict:
    ok = [r for r in results if r.ok]

    def pct(values: list[float]) -> dict:
        if not values:
            return {}
        a = np.asarray(values) * 1e3
        return {"mean_ms": float(a.mean()), **{f"p{p}_ms": float(np.percentile(a, p))
                                               for p in (50, 90, 99)}}

    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    tokens = sum(r.tokens for r in ok)
    return {"setup": setup, "duration_s": duration, "completed": len(ok),
            "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:5],
            "request_throughput": len(ok) / duration, "output_token_throughput": tokens / duration,
            "ttft": pct([r.ttft for r in ok]), "tpot": pct(tpot),
            "itl": pct([x for r in ok for x in r.itl]), "e2e": pct([r.e2e for r in ok]),
            "_raw": [asdict(r) for r in ok]}


def plot(summary: dict, path: str) -> None:
    """Latency distributions (TTFT, TPOT, e2e) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = summary["_raw"]
    series = {"TTFT": [r["ttft"] * 1e3 for r in raw],
              "TPOT": [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) * 1e3 for r in raw
                       if r["tokens"] > 1],
              "end-to-end": [r["e2e"] * 1e3 for r in raw]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        ax.hist(values, bins=30)
        ax.set_title(f"{name} (ms)")
        ax.set_xlabel("ms")
    setup = summary["setup"]
    fig.suptitle(f"{setup['model']}: {summary['completed']} requests, "
                 f"{summary['output_token_throughput']:.1f} output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
