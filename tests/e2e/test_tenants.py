"""API keys, tenants, and live load/unload through the repository API."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from shardserve.api.auth import hash_key
from tests.e2e.test_server import _free_port, _start, _stop

pytestmark = pytest.mark.slow
ADMIN, KEY_A, KEY_B = "sk-admin-test", "sk-tenant-a", "sk-tenant-b"


def _call(url, key=None, body=None, method=None):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def tenant_repo(root, checkpoints, keys: tuple[str, str, str],
                extra: dict[str, str] | None = None):
    """``(auth file, repository)``: admin key ``keys[0]``; tenant a (``keys[1]``) holds
    a-llama (tp=2), tenant b (``keys[2]``) b-mistral and c-qwen; ``extra`` adds lines to a
    model's model.yaml."""
    admin, key_a, key_b = keys
    auth = root / "auth.yaml"
    auth.write_text(f"admin_keys: [{hash_key(admin)}]\ntenants:\n"
                    f"  a: {{keys: [{hash_key(key_a)}], models: [a-llama]}}\n"
                    f"  b: {{keys: [{hash_key(key_b)}], models: [b-mistral, c-qwen]}}\n")
    repo = root / "repo"
    for name, arch, tp in (("a-llama", "llama", 2), ("b-mistral", "mistral", 1),
                           ("c-qwen", "qwen2", 1)):
        (repo / name).mkdir(parents=True)
        (repo / name / "model.yaml").write_text(
            f"weights: {checkpoints[arch]}\ntp: {tp}\nmax_num_seqs: 4\n"
            "max_num_batched_tokens: 512\n" + (extra or {}).get(name, ""))
    return auth, repo


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    auth, repo = tenant_repo(tmp_path_factory.mktemp("tenants"), checkpoints,
                             (ADMIN, KEY_A, KEY_B), {"c-qwen": "tenants: [a]\n"})
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:4", "--device-memory",
                   "12MiB", "--auth", str(auth)], port)
    yield f"http://127.0.0.1:{port}", repo
    code = _stop(proc)
    assert code == 0, proc.stdout.read()[-3000:]


def test_keys_and_tenant_isolation(server):
    url, _ = server
    assert _call(f"{url}/v1/models")[0] == 401
    assert _call(f"{url}/v1/models", "sk-wrong")[0] == 401
    status, body = _call(f"{url}/v1/models", KEY_A)
    # a-llama from the auth file; c-qwen because its model.yaml names tenant a
    assert status == 200 and [m["id"] for m in body["data"]] == ["a-llama", "c-qwen"]
    status, body = _call(f"{url}/v1/completions", KEY_A,
                         {"model": "b-mistral", "prompt": "hi", "max_tokens": 2})
    assert status == 404 and "does not exist" in body["error"]["message"]
    status, _ = _call(f"{url}/v1/completions", KEY_B,
                      {"model": "b-mistral", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    assert _call(f"{url}/v2/models/a-llama", KEY_B)[0] == 404
    assert [r["name"] for r in _call(f"{url}/v2/repository/index", KEY_B)[1]] == [
        "b-mistral", "c-qwen"]


def test_repository_control_needs_the_admin_key(server):
    url, _ = server
    assert _call(f"{url}/v2/repository/models/c-qwen/unload", method="POST")[0] == 401
    assert _call(f"{url}/v2/repository/models/c-qwen/unload", KEY_B, method="POST")[0] == 403


def test_live_unload_and_load_while_another_model_streams(server):
    url, repo = server
    failures, done = [], threading.Event()

    def client():
        from openai import OpenAI

        api = OpenAI(base_url=f"{url}/v1", api_key=KEY_A, max_retries=0)
        while not done.is_set():
            try:
                chunks = list(api.completions.create(
                    model="a-llama", prompt="Hello", max_tokens=20, stream=True,
                    extra_body={"ignore_eos": True}))
                assert chunks[-1].choices[0].finish_reason == "length"
            except Exception as e:  # counted, not raised: the thread reports through the list
                failures.append(e)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        used = {d["device"]: d["used"] for d in _call(f"{url}/v2/repository/devices", ADMIN)[1]}
        status, _ = _call(f"{url}/v2/repository/models/c-qwen/unload", ADMIN, method="POST")
        assert status == 200
        after = {d["device"]: d["used"] for d in _call(f"{url}/v2/repository/devices", ADMIN)[1]}
        assert sum(after.values()) < sum(used.values())  # the memory came back
        assert "c-qwen" not in [r["name"] for r in _call(f"{url}/v2/repository/index",
                                                          ADMIN)[1]]
        status, _ = _call(f"{url}/v2/repository/models/c-qwen/load", ADMIN, method="POST")
        assert status == 200
        status, _ = _call(f"{url}/v1/completions", KEY_B,
                          {"model": "c-qwen", "prompt": "hi", "max_tokens": 2})
        assert status == 200
    finally:
        done.set()
        thread.join(timeout=120)
    assert not failures, failures


def test_a_load_that_does_not_fit_is_refused_and_changes_nothing(server, checkpoints):
    url, repo = server
    (repo / "huge").mkdir()
    (repo / "huge" / "model.yaml").write_text(
        f"weights: {checkpoints['llama']}\nmax_num_seqs: 64\nmax_num_batched_tokens: 8192\n")
    before = _call(f"{url}/v2/repository/devices", ADMIN)[1]
    status, body = _call(f"{url}/v2/repository/models/huge/load", ADMIN, method="POST")
    assert status == 400 and "needs" in body["error"] and "free" in body["error"]
    assert _call(f"{url}/v2/repository/devices", ADMIN)[1] == before
    assert _call(f"{url}/v2/repository/models/nothing/load", ADMIN, method="POST")[0] == 404
