"""The HTTP server as clients see it: the official openai client and tritonclient against a
real server on loopback."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    """A free port below the kernel's ephemeral range: the server's workers open ephemeral
    loopback sockets (gloo) before the server binds, and could take a port chosen there."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def _start(args: list[str], port: int, env=None) -> subprocess.Popen:
    """The server, ready. Its output goes to a file that ``proc.stdout`` reads from the
    start: a pipe nobody reads would fill up and block the server (and its processes) on a
    log line."""
    with tempfile.NamedTemporaryFile("w", prefix="shardserve-server-", suffix=".log",
                                     delete=False) as log:
        proc = subprocess.Popen([sys.executable, "-m", "shardserve.cli.main", "serve", *args,
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                text=True, env=env)
    proc.stdout = open(log.name)  # noqa: SIM115 - lives as long as the process object
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not become ready")


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    plain = tmp_path_factory.mktemp("plain") / "m"
    from shardserve import test_models

    test_models.write(plain, "qwen2", "tiny")
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    repo = tmp_path_factory.mktemp("repo")
    for name, path, tp in (("llama", checkpoints["llama"], 2), ("plain", plain, 1)):
        (repo / name).mkdir()
        (repo / name / "model.yaml").write_text(
            f"name: {name}\nweights: {path}\ntp: {tp}\nmax_num_seqs: 8\n")
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:2"], port)
    yield f"http://127.0.0.1:{port}"
    code = _stop(proc)
    assert code == 0, proc.stdout.read()[-3000:]


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_models_and_completions(client):
    assert sorted(m.id for m in client.models.list().data) == ["llama", "plain"]
    out = client.completions.create(model="llama", prompt="The quick brown fox", max_tokens=7,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 7 and out.usage.prompt_tokens > 0
    again = client.completions.create(model="llama", prompt="The quick brown fox",
                                      max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == out.choices[0].text
    many = client.completions.create(model="llama", prompt="Hello", max_tokens=5, n=3,
                                     temperature=1.0, seed=4, logprobs=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert all(len(c.logprobs.top_logprobs[0]) >= 2 for c in many.choices)


def test_streaming_with_usage_matches_the_whole_answer(client):
    kwargs = dict(model="llama", prompt="Once upon a time", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_and_chat_streaming(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(model="llama", messages=msgs, max_tokens=6,
                                         temperature=0)
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="llama", messages=msgs, max_tokens=6,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == out.choices[0].message.content


def test_errors_in_openai_shape(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="llama", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="llama", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="plain", messages=[{"role": "user",
                                                                   "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="llama", prompt=[5] * 5000)


def test_kserve_v2_with_tritonclient(server):
    import numpy as np
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("llama") and not triton.is_model_ready("nope")
    meta = triton.get_model_metadata("llama")
    assert meta["inputs"][0]["name"] == "text_input"
    inp = httpclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array(["Hello there"], dtype=object), binary_data=False)
    res = triton.infer("llama", [inp], parameters={"max_tokens": 4, "temperature": 0},
                       outputs=[httpclient.InferRequestedOutput("text_output",
                                                                binary_data=False)])
    assert isinstance(res.get_response()["outputs"][0]["data"][0], str)
    binary = triton.infer("llama", [inp], parameters={"max_tokens": 4, "temperature": 0})
    assert binary.as_numpy("text_output")[0].decode() == \
        res.get_response()["outputs"][0]["data"][0]  # the client's default: binary outputs
    inp.set_data_from_numpy(np.array(["Hello there"], dtype=object))  # binary input too
    both = triton.infer("llama", [inp], parameters={"max_tokens": 4, "temperature": 0})
    assert both.as_numpy("text_output")[0] == binary.as_numpy("text_output")[0]
    req = urllib.request.Request(f"{server}/v2/models/llama/generate", data=json.dumps(
        {"text_input": "Hello there", "parameters": {"max_tokens": 4, "temperature": 0}})
        .encode(), headers={"Content-Type": "application/json"})
    generated = json.loads(urllib.request.urlopen(req).read())["text_output"]
    assert generated == res.get_response()["outputs"][0]["data"][0]


def test_refuses_a_public_bind(checkpoints):
    out = subprocess.run([sys.executable, "-m", "shardserve.cli.main", "serve", "--model",
                          str(checkpoints["llama"]), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "loopback" in out.stderr


def test_sigterm_during_a_stream_finishes_it_then_exits_0(checkpoints, tmp_path):
    port = _free_port()
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    proc = _start(["--model", str(checkpoints["mistral"]), "--devices", "cpu:1"], port, env)
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(model=Path(checkpoints["mistral"]).name, prompt="Hi",
                                       max_tokens=150, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices and rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(timeout=60) == 0


def test_replicas_share_the_load(checkpoints, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "model.yaml").write_text(
        f"weights: {checkpoints['qwen2']}\nreplicas: 2\nmax_num_seqs: 2\n")
    port = _free_port()
    proc = _start(["--repository", str(tmp_path), "--devices", "cpu:2"], port)
    try:
        url = f"http://127.0.0.1:{port}"
        index = json.loads(urllib.request.urlopen(f"{url}/v2/repository/index").read())
        devices = [r["devices"] for r in index[0]["replicas"]]
        assert len(devices) == 2 and devices[0] != devices[1]

        def call(_):
            req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(
                {"model": "r", "prompt": "Hello", "max_tokens": 30, "ignore_eos": True})
                .encode(), headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req).read())["usage"]["completion_tokens"]

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(call, range(6))) == [30] * 6
        metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        for replica in ("0", "1"):
            assert f'shardserve:replica_requests_total{{model_name="r",replica="{replica}"}}' \
                in metrics
    finally:
        assert _stop(proc) == 0
