"""A DLRM served over KServe v2 through tritonclient: tables sharded over two devices, scores
batched with other requests equal to the same request alone, each bad input a 400 naming it,
and the model serving on after every one."""

import numpy as np
import pytest

from shardserve import test_models
from shardserve.config import ModelConfig
from tests.distributed.test_dlrm import Reference, batch
from tests.e2e.test_server import _free_port, _start, _stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("rec")
    weights = test_models.write(repo / "weights", "dlrm", "small")
    (repo / "ranker").mkdir()
    (repo / "ranker" / "model.yaml").write_text(
        f"kind: recommender\nweights: {weights}\ntp: 2\nmax_batch_size: 16\n"
        "max_queue_delay_ms: 20\n")
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:2"], port)
    yield f"127.0.0.1:{port}", weights
    code = _stop(proc)
    assert code == 0, proc.stdout.read()[-3000:]


def _metric(url, name):
    import urllib.request

    text = urllib.request.urlopen(f"http://{url}/metrics").read().decode()
    line = next(x for x in text.splitlines() if x.startswith(name + '{model_name="ranker"'))
    return float(line.rsplit(" ", 1)[1])


def _inputs(dense, values, lengths, binary=True):
    import tritonclient.http as http

    out = []
    for name, array, kind in (("dense", dense, "FP32"), ("sparse_values", values, "INT64"),
                              ("sparse_lengths", lengths, "INT32")):
        t = http.InferInput(name, list(array.shape), kind)
        t.set_data_from_numpy(array, binary_data=binary)
        out.append(t)
    return out


def test_scores_batched_equal_alone_and_the_reference(server):
    import tritonclient.http as http

    url, weights = server
    spec = ModelConfig(str(weights)).spec
    client = http.InferenceServerClient(url, concurrency=16)
    meta = client.get_model_metadata("ranker")
    assert meta["platform"] == "shardserve_recommender"
    assert [i["name"] for i in meta["inputs"]] == ["dense", "sparse_values", "sparse_lengths"]
    requests = [batch(spec, 1 + i % 5, seed=i) for i in range(24)]
    ref = Reference(weights)
    alone = []
    for r in requests[:4]:
        res = client.infer("ranker", _inputs(*r))
        alone.append(res.as_numpy("score"))
        np.testing.assert_allclose(alone[-1], ref(*r), atol=1e-5, rtol=0)
    # concurrent (the client's own gevent pool): they share batches
    b0, i0 = _metric(url, "shardserve:encoder_batches_total"), \
        _metric(url, "shardserve:encoder_batched_requests_total")
    pending = [client.async_infer("ranker", _inputs(*r)) for r in requests]
    together = [p.get_result().as_numpy("score") for p in pending]
    items = _metric(url, "shardserve:encoder_batched_requests_total") - i0
    assert items == len(requests) and _metric(url, "shardserve:encoder_batches_total") - b0 \
        < len(requests)
    for got, r in zip(together, requests, strict=True):
        np.testing.assert_allclose(got, ref(*r), atol=1e-5, rtol=0)
    for got, want in zip(together[:4], alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # JSON data as well as binary
    json_res = client.infer("ranker", _inputs(*requests[0], binary=False))
    np.testing.assert_allclose(json_res.as_numpy("score"), alone[0], atol=1e-6)


def test_bad_inputs_are_400s_naming_them(server):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    url, weights = server
    spec = ModelConfig(str(weights)).spec
    client = http.InferenceServerClient(url)
    dense, values, lengths = batch(spec, 3, seed=7)
    first = int(lengths[0].sum())
    big = values.copy()
    big[first] = spec.num_embeddings[1] + 5
    neg = values.copy()
    neg[0] = -1
    bad_len = lengths.copy()
    bad_len[2, 0] = -2
    cases = [
        ((dense[:, :12], values, lengths), "dense: expected FP32 \\[N, 13\\]"),
        ((dense, values, lengths[:25]), "sparse_lengths: expected INT32 \\[26, 3\\]"),
        ((dense, values[:-1], lengths), "sparse_lengths sum to"),
        ((dense, big, lengths), "feature cat_1 has id"),
        ((dense, neg, lengths), "feature cat_0 has id -1"),
        ((dense, values, bad_len), "feature cat_2 has a negative length"),
    ]
    for args, message in cases:
        with pytest.raises(InferenceServerException, match=message) as e:
            client.infer("ranker", _inputs(*args))
        assert e.value.status() == "400"
    missing = _inputs(dense, values, lengths)[:2]
    with pytest.raises(InferenceServerException, match="expected the inputs"):
        client.infer("ranker", missing)
    assert client.infer("ranker", _inputs(dense, values, lengths)).as_numpy("score").shape \
        == (3,)


def test_serve_model_takes_its_kind_from_config_json(server):
    """``serve --model DIR`` of a DLRM folder, no --kind: served as a recommender."""
    import tritonclient.http as http

    _, weights = server
    port = _free_port()
    proc = _start(["--model", str(weights), "--name", "solo", "--tp", "2", "--devices",
                   "cpu:2"], port)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.get_model_metadata("solo")["platform"] == "shardserve_recommender"
        spec = ModelConfig(str(weights)).spec
        assert client.infer("solo", _inputs(*batch(spec, 2, seed=3))).as_numpy(
            "score").shape == (2,)
    finally:
        assert _stop(proc) == 0
