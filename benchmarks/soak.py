"""Soak: a server under mixed good, bad and vanishing clients at twice its admission limit,
with a worker killed every minute. Every request must get exactly one answer, and the
server's memory and open file descriptors must stay flat after warm-up.

    python benchmarks/soak.py [--duration 600] [--kill-every 60] [--out soak.json]

Server: its own process on loopback, ``--devices cpu:3``: a tiny random-weight Llama at tp=2
(max_num_seqs 8, --max-queue 8: 16 admitted) and a tiny BERT encoder (max_batch_size 8).
Clients (threads, raw HTTP): 32 on the LLM (twice its admission limit) and 8 on the encoder,
each looping over: a good completion (half streamed), a bad body (must be 400), a stream it
abandons after the first event, a non-streaming request it abandons, a good or bad
embedding. An answer is a complete HTTP response, or for a stream one that ends with
``[DONE]``; an abandoned request has no answer to count. A request with no answer (a
connection error, a cut stream, a client-side timeout of 120 s) is a failure. Every
``--kill-every`` seconds one worker (alternating between the models and ranks) is SIGKILLed.
Every 10 s the server process's RSS and open descriptors (and its workers' RSS) are sampled.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardserve import test_models  # noqa: E402
from tests.e2e.test_server import _free_port, _start, _stop  # noqa: E402

LLM, ENCODER = "llm", "enc"


class Client(threading.Thread):
    def __init__(self, port: int, model: str, seed: int, stop: threading.Event,
                 tally: Counter, lock: threading.Lock) -> None:
        super().__init__(daemon=True)
        self.port, self.model, self.rng, self.stop = port, model, random.Random(seed), stop
        self.tally, self.lock = tally, lock

    def run(self) -> None:
        while not self.stop.is_set():
            kind = self.rng.choice(["good", "stream", "bad", "leave-stream", "leave"]
                                   if self.model == LLM else ["embed", "embed", "bad-embed"])
            try:
                outcome = getattr(self, "_" + kind.replace("-", "_"))()
            except (OSError, http.client.HTTPException) as e:
                outcome = f"no answer ({type(e).__name__})"
            with self.lock:
                self.tally[(kind, outcome)] += 1

    def _request(self, body: dict, path: str = "/v1/completions"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return conn, conn.getresponse()

    def _body(self, **kw) -> dict:
        return {"model": LLM, "prompt": "Hello " * self.rng.randint(1, 40),
                "max_tokens": self.rng.randint(1, 64), "ignore_eos": True, **kw}

    def _good(self) -> str:
        conn, r = self._request(self._body())
        r.read()
        conn.close()
        return str(r.status)

    def _stream(self) -> str:
        conn, r = self._request(self._body(stream=True))
        if r.status != 200:
            r.read()
            conn.close()
            return str(r.status)
        last, error = b"", False
        for line in r:
            if line.startswith(b"data: "):
                last = line[6:].strip()
                error = error or b'"error"' in last
        conn.close()
        if last != b"[DONE]":
            return "no answer (stream cut)"
        return "200+error event" if error else "200"

    def _bad(self) -> str:
        bad = self.rng.choice([{"temperature": -1}, {"top_k": 2**63}, {"seed": 2**64},
                               {"repetition_penalty": 1e-40}, {"prompt": [99999999]},
                               {"stop": ["x"] * 100}, {"max_tokens": 10**9}])
        conn, r = self._request(self._body(**bad))
        r.read()
        conn.close()
        return str(r.status)

    def _leave_stream(self) -> str:
        conn, r = self._request(self._body(stream=True, max_tokens=200))
        if r.status == 200:
            r.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        return "abandoned"

    def _leave(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps(self._body(max_tokens=200)),
                     {"Content-Type": "application/json"})
        time.sleep(self.rng.random() * 0.5)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        return "abandoned"

    def _embed(self) -> str:
        conn, r = self._request({"model": ENCODER, "input": "a sentence " *
                                 self.rng.randint(1, 30)}, "/v1/embeddings")
        r.read()
        conn.close()
        return str(r.status)

    def _bad_embed(self) -> str:
        conn, r = self._request({"model": ENCODER, "input": [[99999999]]}, "/v1/embeddings")
        r.read()
        conn.close()
        return str(r.status)


def _tree(pid: int) -> dict:
    """RSS (bytes) and open descriptors of the server, and its workers' total RSS."""
    def rss(p: int) -> int:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    workers = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
               and _parent(int(e.name)) == pid]
    return {"server_rss": rss(pid), "server_fds": len(os.listdir(f"/proc/{pid}/fd")),
            "workers": len(workers), "workers_rss": sum(rss(w) for w in workers)}


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _workers(pid: int) -> dict[str, int]:
    out = {}
    for e in Path("/proc").iterdir():
        if e.name.isdigit() and _parent(int(e.name)) == pid:
            argv = (e / "cmdline").read_bytes().split(b"\0")
            if b"shardserve.runtime.worker" in argv:
                out[[a for a in argv if a][-1].decode()] = int(e.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--kill-every", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=120)
    ap.add_argument("--out", help="write the summary here as JSON")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    repo = root / "repo"
    llm = test_models.write(root / "llama", "llama", "tiny")
    bert = test_models.write(root / "bert", "bert", "tiny")
    for name, text in ((LLM, f"weights: {llm}\ntp: 2\nmax_num_seqs: 8\nstep_timeout_s: 30\n"),
                       (ENCODER, f"weights: {bert}\nkind: encoder\nmax_batch_size: 8\n")):
        (repo / name).mkdir(parents=True)
        (repo / name / "model.yaml").write_text(text)
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:3", "--max-queue", "8"], port,
                  dict(os.environ, XDG_CACHE_HOME=str(root)))
    stop, lock, tally = threading.Event(), threading.Lock(), Counter()
    clients = [Client(port, LLM, i, stop, tally, lock) for i in range(32)]
    clients += [Client(port, ENCODER, 100 + i, stop, tally, lock) for i in range(8)]
    for c in clients:
        c.start()
    t0, samples, kills, victims = time.monotonic(), [], [], ["llm/0:rank0", "enc/0:rank0",
                                                               "llm/0:rank1"]
    next_kill, next_sample = t0 + args.kill_every, t0
    try:
        while time.monotonic() - t0 < args.duration:
            now = time.monotonic()
            if now >= next_sample:
                samples.append({"t": round(now - t0), **_tree(proc.pid)})
                next_sample += 10
            if now >= next_kill:
                label = victims[len(kills) % len(victims)]
                pid = _workers(proc.pid).get(label)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                kills.append({"t": round(now - t0), "worker": label, "found": pid is not None})
                next_kill += args.kill_every
            time.sleep(0.5)
    finally:
        stop.set()
        for c in clients:
            c.join(150)
        index, admitted = json.loads(_get(port, "/v2/repository/index")), _admitted(port)
        code = _stop(proc)
    summary = _summary(args, tally, samples, kills, index, code)
    summary["admitted_at_the_end"] = admitted  # every admission released: 0 per model
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


def _admitted(port: int) -> dict[str, float]:
    """shardserve:num_requests_admitted per model, once the clients have stopped."""
    time.sleep(2)  # the last abandoned requests' aborts land
    out = {}
    for line in _get(port, "/metrics").decode().splitlines():
        if line.startswith("shardserve:num_requests_admitted{"):
            out[line.split('model_name="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def _summary(args, tally: Counter, samples: list, kills: list, index, code: int) -> dict:
    answered = {f"{k} -> {o}": n for (k, o), n in sorted(tally.items())}
    unanswered = sum(n for (_, o), n in tally.items() if o.startswith("no answer"))
    settled = [s for s in samples if s["t"] >= args.warmup]

    def spread(key: str) -> dict:
        values = [s[key] for s in settled] or [0]
        return {"min": min(values), "max": max(values), "first": values[0], "last": values[-1]}

    summary = {"duration_s": args.duration, "requests": sum(tally.values()),
               "unanswered": unanswered, "outcomes": answered, "kills": kills,
               "restarts": {row["name"]: sum(r["restarts"] for r in row["replicas"])
                            for row in index},
               "states": {row["name"]: row["state"] for row in index},
               "after_warmup": {k: spread(k) for k in ("server_rss", "server_fds",
                                                       "workers", "workers_rss")},
               "samples": samples, "server_exit_code": code}
    return summary


if __name__ == "__main__":
    main()
