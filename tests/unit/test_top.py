"""`shardserve top`'s rendering of a server's /v2/status (a snapshot), and the rolling window
behind its latency columns."""

from pathlib import Path

from shardserve.api.metrics import Recent
from shardserve.cli.top import render

MiB = 1 << 20
STATUS = {
    "time": 0.0, "auth": True,
    "devices": [
        {"name": "cpu:0", "budget": 100 * MiB, "used": 60 * MiB, "parts": [
            {"deployment": "llm", "replica": 0, "bytes": 50 * MiB, "weights": 20 * MiB,
             "kv_cache": 25 * MiB, "activations": 5 * MiB},
            {"deployment": None, "bytes": 10 * MiB}]},
        {"name": "cpu:1", "budget": 100 * MiB, "used": 50 * MiB, "parts": [
            {"deployment": "llm", "replica": 0, "bytes": 50 * MiB, "weights": 20 * MiB,
             "kv_cache": 25 * MiB, "activations": 5 * MiB}]}],
    "deployments": [
        {"name": "llm", "kind": "llm", "state": "READY", "tp": 2, "pp": 1,
         "precision": "native-float32",
         "replicas": [{"devices": ["cpu:0", "cpu:1"], "state": "READY", "restarts": 0}],
         "running": 3, "waiting": 1, "kv_cache_usage": 0.25, "tokens_per_s": 41.5,
         "ttft_ms": {"p50": 12.25, "p99": 80.0, "requests": 9},
         "tpot_ms": {"p50": 20.0, "p99": 31.5, "requests": 8}},
        {"name": "embed", "kind": "encoder", "state": "LOADING", "replicas": []}]}


def test_top_renders_the_status_as_the_snapshot():
    snapshot = Path(__file__).with_name("data") / "top_snapshot.txt"
    text = render(STATUS, "http://127.0.0.1:8000")
    assert text.split("\n", 1)[1] == snapshot.read_text().split("\n", 1)[1], text


def test_the_window_keeps_the_last_minute():
    now = [0.0]
    recent = Recent(60.0, clock=lambda: now[0])
    for i in range(100):
        now[0] = i
        recent.add("ttft", "m", i / 1000)  # 0..99 ms
        recent.add("tokens", "m", 6)
    now[0] = 100.0
    s = recent.summary("m")
    assert s["ttft_ms"]["requests"] == 60  # added at 40..99
    assert abs(s["ttft_ms"]["p50"] - 69.5) < 1e-9 and abs(s["ttft_ms"]["p99"] - 98.41) < 1e-9
    assert s["tokens_per_s"] == 6.0 and s["tpot_ms"] == {"p50": None, "p99": None,
                                                         "requests": 0}
    now[0] = 200.0  # a quiet minute later: nothing
    assert recent.summary("m")["ttft_ms"]["requests"] == 0


def test_the_window_keeps_no_more_than_a_minute_unread():
    now = [0.0]
    recent = Recent(60.0, clock=lambda: now[0])
    for i in range(1000):  # a busy server nobody polls
        now[0] = i
        recent.add("tokens", "m", 1)
    assert len(recent._samples[("tokens", "m")]) == 61  # 939..999
