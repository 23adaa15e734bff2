"""Fault containment against a real server process: bad input, dead and hung workers, a crash
loop, failed loads, unloads under load, hostile and vanishing clients, and the isolation
between tenants. One server for the module (its tests run in file order: the destructive ones
last)."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shardserve import test_models
from shardserve.api.auth import hash_key
from tests.conftest import our_processes, shm_leftovers
from tests.e2e.test_server import _free_port, _start, _stop

pytestmark = pytest.mark.slow
ADMIN, T, U = "sk-admin-faults", "sk-tenant-t", "sk-tenant-u"
PIPELINE = """\
name: pipe
steps:
  - {name: embed, kind: embed, model: mini}
  - {name: intent, kind: nearest, source: embed, labels: {a: [hello there], b: [rain today]}}
  - {name: answer, kind: generate, model: big, by: intent, max_tokens: 4,
     template: {a: "Hi: {input}", b: "Rain: {input}"}}
"""


class Server:
    def __init__(self, proc, port, root):
        self.proc, self.port, self.root = proc, port, root
        self.url = f"http://127.0.0.1:{port}"

    def call(self, path, body=None, key=ADMIN, method=None, timeout=120):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                     method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw.startswith((b"{", b"[")) else raw

    def complete(self, model="big", **kw):
        body = {"model": model, "prompt": "Hello there", "max_tokens": 6, "temperature": 0,
                **kw}
        return self.call("/v1/completions", body)

    def index(self):
        return {row["name"]: row for row in self.call("/v2/repository/index")[1]}

    def workers(self, label=""):
        """{label: pid} of this server's live worker processes whose label starts so."""
        return {k: v for k, v in our_processes(self.proc.pid).items() if k.startswith(label)}

    def cores(self, label=""):
        """{label: pid} of this server's live engine cores whose label starts so."""
        return {k: v for k, v in our_processes(self.proc.pid, b"shardserve.engine.core").items()
                if k.startswith(label)}

    def wait_ready(self, model, timeout=120):
        deadline = time.monotonic() + timeout
        while self.call(f"/v2/models/{model}/ready")[0] != 200:
            assert time.monotonic() < deadline, f"{model} did not come back: {self.index()}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    (root / "auth.yaml").write_text(
        f"admin_keys: [{hash_key(ADMIN)}]\ntenants:\n"
        f"  t: {{keys: [{hash_key(T)}], models: '*'}}\n"
        f"  u: {{keys: [{hash_key(U)}], models: [other, pipe]}}\n")
    repo = root / "repo"
    bert = test_models.write(root / "bert", "bert", "tiny")
    fragile = shutil.copytree(checkpoints["qwen2"], root / "fragile-weights")
    (fragile / "tokenizer.json").unlink()  # a model with no tokenizer: token ids only
    models = {"big": (checkpoints["llama"], "tp: 2\nstep_timeout_s: 5\nmax_restarts: 5\n"),
              "other": (checkpoints["qwen2"], ""),
              "mini": (bert, "kind: encoder\nmax_batch_size: 8\n"),
              "fragile": (fragile, "max_restarts: 2\n"),
              "spare-llm": (checkpoints["mistral"], ""),
              "spare-enc": (bert, "kind: encoder\n")}
    for name, (weights, extra) in models.items():
        (repo / name).mkdir(parents=True)
        (repo / name / "model.yaml").write_text(f"weights: {weights}\nmax_num_seqs: 8\n{extra}")
    (repo / "pipe").mkdir()
    (repo / "pipe" / "pipeline.yaml").write_text(PIPELINE)
    port, started = _free_port(), time.time()
    proc = _start(["--repository", str(repo), "--devices", "cpu:4", "--auth",
                   str(root / "auth.yaml"), "--header-timeout-s", "1", "--body-timeout-s", "2",
                   "--drain-timeout-s", "3"], port)
    server = Server(proc, port, root)
    server.started = started
    yield server
    code = _stop(proc)
    assert code == 0, proc.stdout.read()[-3000:]
    assert not shm_leftovers(started)


# -- bad input -----------------------------------------------------------------------------
LLM_BAD = [
    ("/v1/completions", {"repetition_penalty": 1e-40}, "repetition_penalty"),
    ("/v1/completions", {"top_k": 2**63}, "top_k"),
    ("/v1/completions", {"seed": 2**64}, "seed"),
    ("/v1/completions", {"seed": 2**64 - 1, "n": 2}, "seed"),
    ("/v1/completions", {"temperature": 1e400}, "temperature"),
    ("/v1/completions", {"stop": ["x"] * 100}, "stop"),
    ("/v1/completions", {"stop_token_ids": list(range(5000))}, "stop_token_ids"),
    ("/v1/completions", {"prompt": [99999999]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"model": "fragile", "prompt": [5, 6], "stop": ["x"]}, "stop"),
    ("/v1/chat/completions", {"top_p": 0, "messages": [{"role": "user", "content": "hi"}]},
     "top_p"),
    ("/v2/models/big/generate", {"text_input": "hi", "parameters": {"top_k": 2**63}}, "top_k"),
    ("/v2/models/big/generate", {"text_input": "hi",
                                 "parameters": {"repetition_penalty": 1e-40}},
     "repetition_penalty"),
    ("/v2/models/big/generate", {"text_input": "hi", "parameters": {"seed": 2**64}}, "seed"),
    ("/v2/models/big/infer", {"inputs": [{"name": "text_input", "datatype": "BYTES",
                                          "shape": [1], "data": ["hi"]}],
                              "parameters": {"temperature": "hot"}}, "temperature"),
]
ENCODER_BAD = [
    ("/v1/embeddings", {"model": "mini", "input": [[99999999]]}, "input"),
    ("/v1/embeddings", {"model": "mini", "input": [[-1]]}, "input"),
    ("/v1/embeddings", {"model": "mini", "input": [[1, 2], []]}, "input"),
    ("/v2/models/mini/infer", {"inputs": [{"name": "input_ids", "datatype": "INT64",
                                           "shape": [1, 2], "data": [5, 99999999]}]},
     "input_ids"),
]


def _message(body):
    error = body["error"]
    return error["message"] if isinstance(error, dict) else error


@pytest.mark.parametrize("path,fields,name", LLM_BAD + ENCODER_BAD,
                         ids=[f"{p}:{n}" for p, _, n in LLM_BAD + ENCODER_BAD])
def test_a_bad_request_is_a_400_naming_its_field_and_the_model_keeps_serving(
        server, path, fields, name):
    body = fields
    if path in ("/v1/completions", "/v1/chat/completions"):
        body = {"model": "big", "prompt": "Hello", "max_tokens": 4, **fields}
    status, reply = server.call(path, body)
    assert status == 400 and name in _message(reply), reply
    assert "Traceback" not in _message(reply)
    if "embeddings" in path or "mini" in path:
        assert server.call("/v1/embeddings", {"model": "mini", "input": "a cat"})[0] == 200
    else:
        assert server.complete()[0] == 200


def test_values_that_used_to_break_a_step_are_served(server):
    """A temperature under 1e-5 is greedy (as vLLM); a vanishing top_p keeps the top token."""
    greedy = server.complete()[1]["choices"][0]["text"]
    for extra in ({"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-50, "seed": 3}):
        status, reply = server.complete(**extra)
        assert status == 200 and reply["choices"][0]["text"] == greedy


# -- isolation -----------------------------------------------------------------------------
def test_metrics_need_a_key_and_a_tenant_sees_only_its_models(server):
    assert server.call("/metrics", key="nope")[0] == 401
    req = urllib.request.Request(server.url + "/metrics")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 401
    text = server.call("/metrics", key=U)[1].decode()
    models = {line.split('model_name="')[1].split('"')[0] for line in text.splitlines()
              if 'model_name="' in line}
    assert models == {"other"}
    assert "device_memory" not in text
    admin = server.call("/metrics")[1].decode()
    assert 'model_name="big"' in admin and "device_memory_budget_bytes" in admin
    assert 'shardserve:model_info{compute_dtype="float32",dtype="float32",kernels=' \
           '"native-float32",kv_cache_dtype="float32",model_name="big"} 1.0' in admin
    devices = server.call("/v2/repository/devices")[1]
    assert any(row["kernels"].get("big/0") == "native-float32" for row in devices)


def test_no_socket_listens_on_a_wildcard_address(server):
    import psutil

    procs = [psutil.Process(server.proc.pid)]
    procs += procs[0].children(recursive=True)
    listening = [c.laddr for p in procs for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert any(a.port == server.port for a in listening)
    assert all(a.ip in ("127.0.0.1", "::1") for a in listening), listening


def test_a_pipeline_needs_the_tenant_to_reach_every_step_model(server):
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                        "data": ["hello there, friend"]}]}
    assert server.call("/v2/models/pipe/infer", body, key=U)[0] == 404  # mini, big not its
    assert server.call("/v2/models/pipe/ready", key=U)[0] == 404
    status, reply = server.call("/v2/models/pipe/infer", body, key=T)
    assert status == 200 and {o["name"] for o in reply["outputs"]} >= {"intent", "text_output"}
    status, reply = server.call("/v2/models/pipe/infer", {"inputs": [
        {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x " * 5000]}]})
    assert status == 400 and "step 'embed'" in reply["error"]  # a refusal stays a 400


# -- clients -------------------------------------------------------------------------------
def test_slow_clients_cannot_hold_a_connection(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")  # never finishes
        t0 = time.monotonic()
        assert s.recv(1024) == b"" and time.monotonic() - t0 < 5  # closed by the server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply


def _gauge(server, name, model="big"):
    text = server.call("/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(f'shardserve:{name}{{model_name="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _settles(server, name, timeout=5.0):
    deadline = time.monotonic() + timeout
    while _gauge(server, name) != 0:
        assert time.monotonic() < deadline, f"{name} stayed above 0"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_is_aborted_and_released(server, stream):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": "big", "prompt": "Hello", "max_tokens": 1000, "ignore_eos": True,
         "stream": stream}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}"})
    deadline = time.monotonic() + 30
    while _gauge(server, "num_requests_running") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conn.sock.shutdown(socket.SHUT_RDWR)  # before reading a byte of the answer
    conn.close()
    _settles(server, "num_requests_running")  # aborted: its blocks are free
    _settles(server, "num_requests_admitted")  # and its admission released


# CPython 3.11's AST validator, met inside schemathesis's generator: hypothesis parses the
# source of a lambda deep in a recursive strategy (hypothesis 6.170, schemathesis 4.32.5,
# CPython 3.11.7; two seeds in a row on 2026-12-08). The operation whose examples it was
# drawing goes untested in that run; nothing was sent to the server.
_TOOL_BUG = "SystemError: AST constructor recursion depth mismatch"


def _only_tool_bugs(stdout: str) -> bool:
    """Whether a failed schemathesis run failed no check and every error it reports is
    ``_TOOL_BUG`` (its summary: ``Errors:`` then a line per kind, ``🚫 Runtime Error: 1``)."""
    summary = stdout.rpartition("Errors:")[2].split("\n\n", 1)[0]
    kinds = {k: int(n) for k, n in re.findall(r"🚫 ([^:\n]+): (\d+)", summary)}
    return ("FAILURES" not in stdout and set(kinds) == {"Runtime Error"}
            and stdout.count(_TOOL_BUG) >= kinds["Runtime Error"])


def test_a_fuzz_run_finds_no_server_error(server, tmp_path):
    """schemathesis over the server's own OpenAPI schema, with the model names filled in so
    its requests reach the models (a tenant's key: everything but repository control)."""
    schema = server.call("/openapi.json")[1]
    names = ["big", "other", "mini", "fragile", "pipe"]
    for component in schema["components"]["schemas"].values():
        if "model" in component.get("properties", {}):
            component["properties"]["model"] = {"type": "string", "enum": names}
    for operations in schema["paths"].values():
        for op in operations.values():
            for p in op.get("parameters", []):
                if p["name"] == "name":
                    p["schema"] = {"type": "string", "enum": names}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    st = Path(sys.executable).with_name("st")
    for seed in (7, 8):
        out = subprocess.run(
            [str(st), "run", str(tmp_path / "schema.json"), "--url", server.url,
             "--checks", "not_a_server_error", "--phases", "coverage,fuzzing", "--max-examples",
             "15", "--max-time", "60", "--request-timeout", "60", "--workers", "2",
             "--generation-database", "none", "--seed", str(seed), "--no-color",
             "-H", f"Authorization: Bearer {T}"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)
        # A failed check (a 5xx) fails at once; an error of schemathesis itself with no
        # failed check gets one more run with another seed.
        if out.returncode == 0 or "FAILURES" in out.stdout or _only_tool_bugs(out.stdout):
            break
    assert out.returncode == 0 or _only_tool_bugs(out.stdout), out.stdout[-12000:]
    assert server.complete()[0] == 200
    assert server.call("/v2/health/ready")[0] == 200


# -- dead and hung workers -----------------------------------------------------------------
def _stream(server, model, max_tokens=900):
    """(events, seconds from the request to each event) of one SSE completion."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True,
         "stream": True}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}"})
    r = conn.getresponse()
    assert r.status == 200
    return conn, r


def _events(r):
    """The SSE events to [DONE], each with the time it arrived."""
    out = []
    while True:
        line = r.readline()
        assert line, "the stream was cut without [DONE]"
        if line.startswith(b"data: "):
            data = line[6:].strip()
            out.append((data, time.monotonic()))
            if data == b"[DONE]":
                return out


class Background:
    """Streams completions from ``model`` until stopped; records every failure."""

    def __init__(self, server, model):
        self.server, self.model, self.failures, self.done = server, model, [], 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, r = _stream(self.server, self.model, max_tokens=40)
                events = _events(r)
                conn.close()
                if any(b'"error"' in e for e, _ in events):
                    self.failures.append(events[-2][0])
                self.done += 1
            except Exception as e:
                self.failures.append(repr(e))

    def finish(self):
        self.stop.set()
        self.thread.join(120)
        return self.failures


@pytest.mark.parametrize("rank", [0, 1])
def test_a_killed_rank_fails_its_streams_fast_and_the_group_comes_back(server, rank):
    index = server.index()
    big = set(index["big"]["replicas"][0]["devices"])
    apart = [m for m in ("other", "spare-llm") if not big & set(index[m]["replicas"][0]["devices"])]
    before = server.complete()[1]["choices"][0]["text"]
    restarts = index["big"]["replicas"][0]["restarts"]
    other = Background(server, apart[0])  # a model on other devices streams throughout
    try:
        victim = server.workers(f"big/0:rank{rank}")[f"big/0:rank{rank}"]
        conn, r = _stream(server, "big")
        assert r.readline().startswith(b"data: ")  # it runs
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        events = _events(r)
        conn.close()
        assert b'"error"' in events[-2][0] and b"restarting" in events[-2][0]
        assert events[-1][1] - killed < 2.0
        assert server.call("/v2/models/big/ready")[0] == 503
        assert server.call("/v2/health/ready")[0] == 503
        status, reply = server.complete()
        assert status == 503 and "restarting" in reply["error"]["message"]
        server.wait_ready("big")
        assert server.complete()[1]["choices"][0]["text"] == before
    finally:
        failures = other.finish()
    assert not failures and other.done > 0
    assert server.index()["big"]["replicas"][0]["restarts"] == restarts + 1
    pids = server.workers("big/")
    assert len(pids) == 2 and victim not in pids.values()
    assert not shm_leftovers(server.started)  # every group unlinks its file once formed


def test_a_killed_engine_core_fails_its_streams_and_comes_back_with_new_workers(server):
    """The engine core is a process of its own: its death is a group failure like a
    worker's: its streams end with an error at once, its workers go with it (no orphans),
    the supervisor starts a new core and group, other models keep serving."""
    index = server.index()
    big = set(index["big"]["replicas"][0]["devices"])
    apart = [m for m in ("other", "spare-llm") if not big & set(index[m]["replicas"][0]["devices"])]
    restarts = index["big"]["replicas"][0]["restarts"]
    core, workers = server.cores("big/0")["big/0:core"], server.workers("big/0")
    other = Background(server, apart[0])
    try:
        conn, r = _stream(server, "big")
        assert r.readline().startswith(b"data: ")
        killed = time.monotonic()
        os.kill(core, signal.SIGKILL)
        events = _events(r)
        conn.close()
        assert b'"error"' in events[-2][0] and b"restarting" in events[-2][0], events[-2]
        assert b"engine core" in events[-2][0] and events[-1][1] - killed < 2.0
        server.wait_ready("big")
        assert server.complete()[0] == 200
    finally:
        failures = other.finish()
    assert not failures and other.done > 0
    assert server.index()["big"]["replicas"][0]["restarts"] == restarts + 1
    deadline = time.monotonic() + 10  # the old workers saw their parent go
    while set(workers.values()) & set(server.workers().values()):
        assert time.monotonic() < deadline, "workers of the killed core outlived it"
        time.sleep(0.2)
    assert core not in server.cores().values() and len(server.workers("big/0")) == 2


def test_a_hung_worker_is_found_by_the_watchdog_and_replaced(server):
    restarts = server.index()["big"]["replicas"][0]["restarts"]
    victim = server.workers("big/0:rank1")["big/0:rank1"]
    conn, r = _stream(server, "big")
    r.readline()
    stopped = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    events = _events(r)
    conn.close()
    assert b"hung" in events[-2][0] and events[-1][1] - stopped < 5 + 3  # step_timeout_s 5
    server.wait_ready("big")
    row = server.index()["big"]
    assert row["replicas"][0]["restarts"] == restarts + 1
    assert "hung" in row["replicas"][0]["reason"]
    assert victim not in server.workers().values()
    assert server.complete()[0] == 200


# -- loads ---------------------------------------------------------------------------------
def test_a_failed_load_changes_nothing_and_leaves_no_worker(server, checkpoints):
    repo = server.root / "repo"
    bad_tok = shutil.copytree(checkpoints["qwen2"], server.root / "bad-tok")
    (bad_tok / "tokenizer.json").write_text("{not json")
    bad_weights = shutil.copytree(checkpoints["qwen2"], server.root / "bad-weights")
    (bad_weights / "model.safetensors").write_bytes(b"\x08" + b"\0" * 15)  # a header, no data
    for name, weights in (("bad-tok", bad_tok), ("bad-weights", bad_weights)):
        (repo / name).mkdir()
        (repo / name / "model.yaml").write_text(f"weights: {weights}\n")
    devices, workers = server.call("/v2/repository/devices")[1], server.workers()
    for name, why in (("bad-tok", "tokenizer"), ("bad-weights", "failed to start")):
        status, reply = server.call(f"/v2/repository/models/{name}/load", method="POST")
        assert status == 400 and why in reply["error"], reply
        assert "Traceback" not in reply["error"]
        assert server.call("/v2/repository/devices")[1] == devices
        assert server.workers() == workers
        assert name not in server.index()


def test_a_crash_loop_stops_says_why_and_a_load_brings_it_back(server, checkpoints):
    weights = server.root / "fragile-weights" / "model.safetensors"
    good = weights.read_bytes()
    assert server.call("/v1/completions", {"model": "fragile", "prompt": [5, 6],
                                           "max_tokens": 2})[0] == 200
    weights.write_bytes(b"\x08" + b"\0" * 15)  # the disk copy is damaged behind our back
    os.kill(server.workers("fragile/0:rank0")["fragile/0:rank0"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while server.index()["fragile"]["state"] != "FAILED":
        assert time.monotonic() < deadline, server.index()["fragile"]
        time.sleep(0.2)
    row = server.index()["fragile"]
    assert "gave up after 2" in row["reason"] and "loading failed" in row["reason"], row
    assert not server.workers("fragile/")
    status, reply = server.call("/v1/completions", {"model": "fragile", "prompt": [5, 6]})
    assert status == 503 and "failed" in reply["error"]["message"]
    assert server.call("/v2/health/ready")[0] == 503
    assert server.complete()[0] == 200  # the others never noticed
    weights.write_bytes(good)
    assert server.call("/v2/repository/models/fragile/load", method="POST")[0] == 200
    assert server.index()["fragile"]["state"] == "READY"
    assert server.call("/v2/health/ready")[0] == 200


@pytest.mark.parametrize("model,path,body", [
    ("spare-llm", "/v1/completions",
     {"model": "spare-llm", "prompt": "Hello", "max_tokens": 200, "ignore_eos": True}),
    ("spare-enc", "/v1/embeddings", {"model": "spare-enc", "input": "a sentence to embed"}),
])
def test_every_request_is_answered_during_an_unload(server, model, path, body):
    """50 clients send back to back while the model is unloaded: each request gets 200 (it
    finished within the drain), 503 (it was cut or refused while draining) or 404 (gone)."""

    def client(_):
        answers = []
        while not answers or answers[-1][0] != 404:
            status, _ = server.call(path, body, timeout=30)
            answers.append((status, time.monotonic()))
        return answers

    with ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(client, i) for i in range(50)]
        time.sleep(1.0)
        t0 = time.monotonic()
        assert server.call(f"/v2/repository/models/{model}/unload", method="POST")[0] == 200
        answers = [a for f in futures for a in f.result(timeout=60)]
    statuses = {s for s, _ in answers}
    assert statuses <= {200, 404, 503} and {200, 404} <= statuses, statuses
    assert max(t for _, t in answers) - t0 < 10
    assert not server.workers(f"{model}/")
