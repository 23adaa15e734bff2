"""The Ray executor on a two-node Ray cluster on this machine (``ray.cluster_utils``, every Ray
process on loopback, token authentication on as Ray 2.60 does for local clusters).

Each pipeline stage is a STRICT_PACK placement group, so at tp=2 x pp=2 on two nodes of two
CPUs the stages land on different nodes. The cluster checks its nodes' health every 0.5 s
(docs/multi-node.md gives the same settings): killing a node's raylet is noticed in about a
second, its actors are reported dead, and the group fails the way a killed local worker does.
"""

import http.client
import json
import os
import signal
import threading
import time

import pytest

from shardserve import LLM, SamplingParams, test_models
from shardserve.runtime.executor import WorkerError
from tests.e2e.test_faults import _events
from tests.e2e.test_server import _free_port, _start, _stop

pytestmark = [pytest.mark.slow, pytest.mark.ray]
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
               "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
PROMPTS = [list(range(3, 40)), [5, 17, 200, 33, 7, 401, 12]]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    old = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind every Ray process to loopback
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "_system_config": FAST_HEALTH})
    c.node2 = c.add_node(num_cpus=2)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if old is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = old


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return test_models.write(tmp_path_factory.mktemp("ray") / "llama", "llama", "small", seed=5)


def test_tp2_pp2_across_two_nodes_gives_the_tokens_of_tp1(cluster, model):
    with LLM(str(model)) as llm:
        ref = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS,
                                                            sampling_params=GREEDY)]
    with LLM(str(model), tensor_parallel_size=2, pipeline_parallel_size=2, executor="ray",
             ray_address=cluster.address) as llm:
        ex = llm.engine.executor
        nodes = [w.node_id for w in ex.workers]
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
        assert {w.ip for w in ex.workers} == {"127.0.0.1"}
        outs = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS,
                                                             sampling_params=GREEDY)]
        assert outs == ref
        stats = ex.collective_rpc("stats")
        assert [s["stage"] for s in stats] == [0, 0, 1, 1]
        # nothing of the cluster (GCS, raylets, actors, gloo) listens beyond loopback
        listening = _listening_addresses()
        assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
        # ranks on this process's node take steps over named pipes, the others Ray's calls
        import ray

        here = ray.get_runtime_context().get_node_id()
        assert [w.direct for w in ex.workers] == [w.node_id == here for w in ex.workers]
        assert any(w.direct for w in ex.workers) and not all(w.direct for w in ex.workers)
        # an actor that dies on a direct pipe fails the group at once, as a local worker does
        victim = next(w for w in ex.workers if w.direct)
        os.kill(victim.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=f"rank {victim.rank}"):
            llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        assert time.monotonic() - t0 < 5


def test_a_stage_that_does_not_fit_is_refused_before_any_actor_starts(cluster, model,
                                                                     monkeypatch):
    from shardserve.config import ModelConfig
    from shardserve.runtime import ray_executor

    def no_actors(*a, **k):
        raise AssertionError("Ray actors were started for a split that cannot fit")

    monkeypatch.setattr(ray_executor, "RayExecutor", no_actors)
    with pytest.raises(ValueError, match=r"pipeline stage 0 \(layers 0-2\) needs"):
        LLM(str(model), pipeline_parallel_size=2, pipeline_split="3,1", executor="ray",
            ray_address=cluster.address, device_memory=str(
                ModelConfig(str(model)).spec.hidden_size * 4 * 1000 * 3))


def _listening_addresses():
    """The addresses the processes below this one (the Ray cluster's) listen on."""
    import psutil

    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            out |= {c.laddr.ip for c in p.net_connections("inet") if c.status == "LISTEN"}
        except psutil.Error:
            continue
    return out


def _stream(port, model, max_tokens):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(
        {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True,
         "temperature": 0, "stream": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    return conn, r


def _text(events):
    return "".join(json.loads(e)["choices"][0]["text"] for e, _ in events[:-1]
                   if b'"choices"' in e)


def _call(port, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST" if body is not None else "GET", path,
                 json.dumps(body) if body is not None else None,
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def test_served_across_nodes_a_dead_node_fails_its_streams_and_the_model_comes_back(
        cluster, model, tmp_path):
    """A tp=2 x pp=2 deployment on the Ray cluster streams through the OpenAI API with the
    tokens of a local tp=1 one. Its second node's raylet is killed mid-stream: that stream
    ends with an error within 5 s, the local model keeps streaming, and once a node joins
    again the deployment is placed anew and serves the same text."""
    repo = tmp_path / "repo"
    for name, extra in (("far", f"executor: ray\ntp: 2\npp: 2\nray_address: "
                                f"'{cluster.address}'\nstep_timeout_s: 30\n"),
                        ("near", "")):
        (repo / name).mkdir(parents=True)
        (repo / name / "model.yaml").write_text(f"weights: {model}\nmax_num_seqs: 4\n{extra}")
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:2"], port)
    try:
        conn, r = _stream(port, "near", 12)
        near_text = _text(_events(r))
        conn.close()
        conn, r = _stream(port, "far", 12)
        assert _text(_events(r)) == near_text
        conn.close()
        index = {row["name"]: row for row in json.loads(_call(port, "/v2/repository/index")[1])}
        assert (index["far"]["tp"], index["far"]["pp"], index["far"]["executor"]) == \
            (2, 2, "ray")
        assert len(index["far"]["replicas"][0]["devices"]) == 4

        failures, done, stop = [], [0], threading.Event()

        def background():
            while not stop.is_set():
                c, rr = _stream(port, "near", 30)
                events = _events(rr)
                c.close()
                if any(b'"error"' in e for e, _ in events):
                    failures.append(events)
                done[0] += 1

        other = threading.Thread(target=background)
        other.start()
        try:
            conn, r = _stream(port, "far", 2000)
            assert r.readline().startswith(b"data: ")
            raylet = cluster.node2.all_processes["raylet"][0].process.pid
            killed = time.monotonic()
            os.kill(raylet, signal.SIGKILL)
            events = _events(r)
            conn.close()
            assert b'"error"' in events[-2][0], events[-2:]
            assert events[-1][1] - killed < 5.0
            cluster.remove_node(cluster.node2, allow_graceful=False)
            cluster.node2 = cluster.add_node(num_cpus=2)  # capacity returns
            deadline = time.monotonic() + 180
            while _call(port, "/v2/models/far/ready")[0] != 200:
                assert time.monotonic() < deadline, "far did not come back"
                time.sleep(0.5)
            conn, r = _stream(port, "far", 12)
            assert _text(_events(r)) == near_text
            conn.close()
        finally:
            stop.set()
            other.join(120)
        assert not failures and done[0] > 0
    finally:
        assert _stop(proc) == 0, proc.stdout.read()[-3000:]
