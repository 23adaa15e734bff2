"""Admission and accounting: 429 past the queue, 413 past the body limit, disconnects free
their blocks, every one of 200 concurrent mixed requests gets exactly one answer, metrics,
and `make serve`'s embedded default answers the curl line it prints."""

import http.client
import json
import os
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.test_server import _free_port, _start, _stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    repo = tmp_path_factory.mktemp("adm")
    (repo / "m").mkdir()
    (repo / "m" / "model.yaml").write_text(
        f"weights: {checkpoints['llama']}\nmax_num_seqs: 2\nmax_num_batched_tokens: 256\n")
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:1", "--max-queue", "3",
                   "--max-body-bytes", "20000", "--max-n", "4"], port)
    yield port
    code = _stop(proc)
    assert code == 0, proc.stdout.read()[-3000:]


def _post(port, path, body, raw=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), payload


def _metric(port, name):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    m = re.search(rf'^{re.escape(name)}\{{[^}}]*model_name="m"[^}}]*\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_queue_full_gives_429_with_retry_after(server):
    body = {"model": "m", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True}
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: _post(server, "/v1/completions", body), range(12)))
    codes = sorted(r[0] for r in results)
    assert set(codes) == {200, 429}
    assert codes.count(200) >= 5  # max_num_seqs 2 + queue 3 were admitted
    for status, headers, payload in results:
        if status == 429:
            assert headers.get("retry-after") == "1"
            assert json.loads(payload)["error"]["type"] == "RateLimitError"


def test_body_limit_and_limits_do_not_echo_input(server):
    big = json.dumps({"model": "m", "prompt": "x" * 30000}).encode()
    status, _, payload = _post(server, "/v1/completions", None, raw=big)
    assert status == 413 and b"xxxx" not in payload
    status, _, payload = _post(server, "/v1/completions", {"model": "m", "prompt": "hi",
                                                          "n": 5})
    assert status == 400 and b"at most 4" in payload


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": "m", "prompt": "Hello " * 50, "max_tokens": 500, "stream": True,
         "ignore_eos": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.fp.readline()  # the first event has arrived: the request holds blocks now
    assert _metric(server, "shardserve:kv_cache_usage_perc") > 0
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 30
    while _metric(server, "shardserve:kv_cache_usage_perc") != 0 and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "shardserve:kv_cache_usage_perc") == 0
    assert _metric(server, "shardserve:num_requests_running") == 0


def test_200_mixed_requests_each_get_exactly_one_answer(server):
    good = {"model": "m", "prompt": "Hi", "max_tokens": 3}
    bad = [{"model": "nope", "prompt": "x"}, {"model": "m", "prompt": "x", "top_p": 2},
           {"model": "m"}, {"model": "m", "prompt": "x", "max_tokens": -1},
           {"model": "m", "prompt": [5] * 5000}]
    plan = [good if i % 2 else bad[i // 2 % len(bad)] for i in range(200)]

    def send(body):
        try:
            return _post(server, "/v1/completions", body, timeout=300)[0:3:2]
        except Exception as e:  # an unanswered request would show here
            return ("no answer", repr(e))

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, plan))
    assert len(answers) == 200
    for body, (status, payload) in zip(plan, answers, strict=True):
        assert isinstance(status, int), payload
        data = json.loads(payload)
        if body is good:
            assert status in (200, 429)
            assert ("choices" in data) == (status == 200)
        else:
            assert status in (400, 404), (body, status, data)
            assert "message" in data["error"]
    assert _metric(server, "shardserve:num_requests_running") == 0


def test_metrics_names(server):
    _post(server, "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 3})
    for name in ("shardserve:time_to_first_token_seconds_count",
                 "shardserve:e2e_request_latency_seconds_count",
                 "shardserve:generation_tokens_total", "shardserve:num_requests_waiting"):
        assert _metric(server, name) is not None, name


def test_the_embedded_default_answers_its_printed_curl_line(tmp_path):
    port = _free_port()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = _start(["--devices", "cpu:2"], port, env)
    try:
        text, deadline = "", time.monotonic() + 120
        while "shardserve listening" not in text:  # the lines come before it serves
            assert time.monotonic() < deadline, text
            chunk = proc.stdout.read()
            text += chunk
            if not chunk:
                time.sleep(0.1)
        lines = text.splitlines()
        curls = [line.strip() for line in lines if line.strip().startswith("curl ")]
        replies = [json.loads(subprocess.run(shlex.split(c), capture_output=True, text=True,
                                             timeout=120).stdout) for c in curls]
        assert all("error" not in r for r in replies), replies
        by_model = {_called(c): r for c, r in zip(curls, replies, strict=True)}
        assert set(by_model) == {"demo-llama-random", "all-minilm-l6-v2", "dlrm-ranker",
                                 "route", "recommend", "whisper-tiny-random", "assistant"}
        assert isinstance(by_model["whisper-tiny-random"]["text"], str)
        heard = {o["name"]: o["data"][0] for o in by_model["assistant"]["outputs"]}
        assert heard["intent"] in ("weather", "greeting", "time") and "heard" in heard
        completion = by_model["demo-llama-random"]
        assert completion["choices"][0]["finish_reason"] in ("length", "stop")
        embedding = by_model["all-minilm-l6-v2"]["data"][0]["embedding"]
        assert len(embedding) == 384
        (score,) = by_model["dlrm-ranker"]["outputs"][0]["data"]
        assert 0 <= score <= 1
        ranked = {o["name"]: o["data"][0] for o in by_model["recommend"]["outputs"]}["ranked"]
        assert len(ranked.split(", ")) == 3
    finally:
        assert _stop(proc) == 0


def _called(curl: str) -> str:
    """The model or pipeline a printed curl line calls."""
    found = re.search(r"/v2/models/([^/]+)/|-F model=(\S+)|\"model\": \"([^\"]+)\"", curl)
    return next(g for g in found.groups() if g)


def test_bench_reports_latencies_and_a_plot(server, tmp_path):
    from shardserve.bench import http_load

    summary = http_load.run(f"http://127.0.0.1:{server}", "m", 6, concurrency=3,
                            prompt_len=8, max_tokens=5)
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["output_token_throughput"] > 0
    assert {"p50_ms", "p90_ms", "p99_ms"} <= set(summary["ttft"]) and summary["tpot"]
    http_load.plot(summary, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 1000
    poisson = http_load.run(f"http://127.0.0.1:{server}", "m", 4, rate=20.0, prompt_len=4,
                            max_tokens=3)
    assert poisson["completed"] == 4
    with pytest.raises(ValueError, match="not a loopback"):
        http_load.run("http://10.1.2.3:8000", "m", 1, concurrency=1)
