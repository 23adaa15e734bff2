"""Encoders over HTTP: /v1/embeddings and KServe v2 infer on the real all-MiniLM-L6-v2
weights, dynamic batching across concurrent requests, and bad input."""

import base64
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from shardserve import test_models
from tests.e2e.test_server import _free_port, _start, _stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("enc")
    (repo / "mini").mkdir()
    (repo / "mini" / "model.yaml").write_text(
        f"kind: encoder\nweights: {test_models.minilm_folder()}\nmax_batch_size: 8\n"
        "max_queue_delay_ms: 20\n")
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:1"], port)
    yield f"http://127.0.0.1:{port}"
    code = _stop(proc)
    assert code == 0, proc.stdout.read()[-3000:]


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_embeddings(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    one = client.embeddings.create(model="mini", input="The quick brown fox",
                                   encoding_format="float")
    vec = np.array(one.data[0].embedding)
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    many = client.embeddings.create(model="mini", input=["a cat", "The quick brown fox"],
                                    encoding_format="float")
    assert [d.index for d in many.data] == [0, 1]
    np.testing.assert_allclose(many.data[1].embedding, vec, atol=1e-5)
    status, body = _post(f"{server}/v1/embeddings", {"model": "mini", "input": "The quick "
                                                     "brown fox", "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, vec, atol=1e-6)
    import openai

    with pytest.raises(openai.BadRequestError, match="is an encoder"):
        client.completions.create(model="mini", prompt="hi")


def test_concurrent_requests_share_batches(server):
    def metric(name):
        text = urllib.request.urlopen(f"{server}/metrics").read().decode()
        line = next(x for x in text.splitlines() if x.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    b0, i0 = metric("shardserve:encoder_batches_total"), \
        metric("shardserve:encoder_batched_requests_total")
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: _post(f"{server}/v1/embeddings", {
            "model": "mini", "input": f"sentence number {i}"})[0], range(16)))
    assert codes == [200] * 16
    batches = metric("shardserve:encoder_batches_total") - b0
    items = metric("shardserve:encoder_batched_requests_total") - i0
    assert items == 16 and batches < 16


def test_kserve_infer_and_bad_input(server):
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    inp = httpclient.InferInput("text_input", [2], "BYTES")
    inp.set_data_from_numpy(np.array(["a cat", "a dog"], dtype=object), binary_data=False)
    res = triton.infer("mini", [inp], outputs=[httpclient.InferRequestedOutput(
        "embedding", binary_data=False)]).get_response()["outputs"][0]
    assert res["name"] == "embedding" and res["shape"] == [2, 384]
    # the binary tensor data extension, which Triton's client asks for by default: raw
    # little-endian float32 after the JSON header
    binary = triton.infer("mini", [inp])
    assert binary.get_output("embedding")["parameters"]["binary_data_size"] == 2 * 384 * 4
    np.testing.assert_array_equal(binary.as_numpy("embedding"),
                                  np.array(res["data"], np.float32).reshape(2, 384))
    url = f"{server}/v2/models/mini/infer"
    ids = {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [101, 4937, 102]}
    assert _post(url, {"inputs": [ids]})[0] == 200
    bad = [
        ({"inputs": [{**ids, "datatype": "FP32"}]}, "INT32 or INT64"),
        ({"inputs": [{**ids, "shape": [1, 4]}]}, "holds 3 integers"),
        ({"inputs": [ids, ids]}, "exactly one input"),
        ({"inputs": [{**ids, "name": "pixels"}]}, "text_input or input_ids"),
        ({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 600],
                      "data": [101] * 600}]}, "at most 512"),
    ]
    for body, message in bad:
        status, reply = _post(url, body)
        assert status == 400 and message in reply["error"], (message, reply)
    status, _ = _post(url, {"inputs": bad[-1][0]["inputs"], "parameters": {"truncate": True}})
    assert status == 200  # truncation only when asked for


def _post_binary(url, header: dict, blob: bytes, size: int | None = None):
    """A request of the binary tensor data extension: JSON, then raw bytes."""
    head = json.dumps(header).encode()
    req = urllib.request.Request(url, data=head + blob, headers={
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head) if size is None else size)})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_kserve_binary_inputs(server):
    """Inputs as binary data (tritonclient's default), equal to the same inputs in JSON; a
    malformed binary body is a 400 naming what is wrong, and the model keeps serving."""
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(url=server.removeprefix("http://"))
    want = httpclient.InferRequestedOutput("embedding", binary_data=False)

    def embed(name, data, datatype, binary):
        inp = httpclient.InferInput(name, list(data.shape), datatype)
        inp.set_data_from_numpy(data, binary_data=binary)
        out = triton.infer("mini", [inp], outputs=[want]).get_response()["outputs"][0]
        return np.array(out["data"], np.float32).reshape(out["shape"])

    texts = np.array(["a cat", "a dog", "ünïcode ☃"], dtype=object)
    np.testing.assert_array_equal(embed("text_input", texts, "BYTES", True),
                                  embed("text_input", texts, "BYTES", False))
    ids = np.array([[101, 4937, 102], [101, 3899, 102]])
    json_ids = embed("input_ids", ids, "INT64", False)
    for dtype, name in ((np.int64, "INT64"), (np.int32, "INT32")):
        np.testing.assert_array_equal(embed("input_ids", ids.astype(dtype), name, True),
                                      json_ids)

    url = f"{server}/v2/models/mini/infer"
    raw = np.array([101, 4937, 102], "<i8").tobytes()
    tensor = {"name": "input_ids", "datatype": "INT64", "shape": [1, 3],
              "parameters": {"binary_data_size": len(raw)}}
    assert _post_binary(url, {"inputs": [tensor]}, raw)[0] == 200
    text = {"name": "text_input", "datatype": "BYTES", "shape": [1]}
    bad = [
        ({"inputs": [tensor]}, raw[:-8], None, "within the 16 bytes left"),
        ({"inputs": [tensor]}, raw + b"\0", None, "1 bytes after the binary data"),
        ({"inputs": [{**tensor, "shape": [1, 2]}]}, raw, None, "is 16 bytes"),
        ({"inputs": [{**tensor, "data": [1, 2, 3]}]}, raw, None, "both 'data'"),
        ({"inputs": [{**tensor, "datatype": "COMPLEX"}]}, raw, None, "not one of"),
        ({"inputs": [{**tensor, "shape": [-1, 3]}]}, raw, None, "negative dimension"),
        ({"inputs": [{**tensor, "parameters": {}}]}, raw, None, "has no data"),
        ({"inputs": [tensor]}, raw, 10**6, "Inference-Header-Content-Length"),
        ({"inputs": [{**text, "parameters": {"binary_data_size": 6}}]},
         (9).to_bytes(4, "little") + b"ab", None, "runs past"),
        ({"inputs": [{**text, "parameters": {"binary_data_size": 6}}]},
         (2).to_bytes(4, "little") + b"\xff\xfe", None, "not UTF-8"),
        ({"inputs": [{**text, "shape": [2], "parameters": {"binary_data_size": 6}}]},
         (2).to_bytes(4, "little") + b"ab", None, "holds 1 elements"),
        ({"inputs": [{"name": "input_ids"}]}, b"", None, "invalid field 'inputs.0.datatype'"),
    ]
    for header, blob, size, message in bad:
        status, reply = _post_binary(url, header, blob, size)
        assert status == 400 and message in reply["error"], (message, reply)
    assert _post_binary(url, {"inputs": [tensor]}, raw)[0] == 200


def _text(httpclient, text):
    inp = httpclient.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([text], dtype=object), binary_data=False)
    return inp


def test_the_route_pipeline_over_tritonclient(tmp_path):
    import os

    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    port = _free_port()
    proc = _start(["--devices", "cpu:2"], port, dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    try:
        triton = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert triton.is_model_ready("route")

        def ask(text):
            inp = httpclient.InferInput("text_input", [1], "BYTES")
            inp.set_data_from_numpy(np.array([text], dtype=object), binary_data=False)
            res = triton.infer("route", [inp])  # outputs as binary tensors: the default
            return {o["name"]: res.as_numpy(o["name"])[0].decode()
                    for o in res.get_response()["outputs"]}

        assert ask("will it rain on saturday")["intent"] == "weather"
        out = ask("hello, good evening")
        assert out["intent"] == "greeting" and isinstance(out["text_output"], str)
        with pytest.raises(InferenceServerException, match="step 'embed'"):
            ask("word " * 600)  # too long for MiniLM: the failing step is named
        # recommend: candidates by MiniLM similarity, ranked by the DLRM (tables over 2)
        assert triton.is_model_ready("dlrm-ranker") and triton.is_model_ready("recommend")
        res = triton.infer("recommend", [_text(httpclient, "boots for a mountain hike")])
        out = {o["name"]: res.as_numpy(o["name"])[0].decode()
               for o in res.get_response()["outputs"]}
        candidates = out["candidates"].split(", ")
        assert len(candidates) == 8 and "waterproof hiking boots" in candidates[:3]
        ranked = out["ranked"].split(", ")
        assert len(ranked) == 3 and set(ranked) <= set(candidates)
        assert out["text_output"] == out["ranked"]
    finally:
        assert _stop(proc) == 0
