"""The command line as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from shardserve.kernels import ops
from shardserve.planner import cost

pytestmark = pytest.mark.slow


def _cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "shardserve.cli.main", *args],
                          capture_output=True, text=True, timeout=240, check=check)


def test_make_test_model_then_generate_at_tp2(tmp_path):
    model = tmp_path / "m"
    _cli("make-test-model", "--arch", "mistral", "--out", str(model), "--seed", "4")
    out = _cli("generate", "--model", str(model), "--tp", "2", "--devices", "cpu:2",
               "--prompt", "The quick brown fox", "--prompt", "Hello", "--max-tokens", "6",
               "--ignore-eos")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["The quick brown fox", "Hello"]
    assert all(len(r["token_ids"]) == 6 and r["finish_reason"] == "length" for r in rows)
    assert all(isinstance(r["text"], str) for r in rows)


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        _cli("make-test-model", "--arch", "qwen2", "--out", str(tmp_path / name), "--seed", "7")
    assert ((tmp_path / "a/model.safetensors").read_bytes()
            == (tmp_path / "b/model.safetensors").read_bytes())
    assert ((tmp_path / "a/tokenizer.json").read_bytes()
            == (tmp_path / "b/tokenizer.json").read_bytes())


def test_plan_and_clear_errors(tmp_path):
    model = tmp_path / "m"
    _cli("make-test-model", "--arch", "llama", "--out", str(model))
    plan = json.loads(_cli("plan", "--json", "--model", str(model), "--tp", "2", "--devices",
                           "cpu:2").stdout)
    (only,) = plan["plans"]
    assert only["tp"] == 2 and only["fits"] and only["bytes_per_device"]["weights"] > 0
    assert plan["chosen"] == 0
    bad = _cli("generate", "--model", str(model), "--device-memory", "lots", "--prompt", "x",
               check=False)
    assert bad.returncode == 2 and "cannot read 'lots' as a size" in bad.stderr
    bad = _cli("generate", "--model", str(tmp_path), "--prompt", "x", check=False)
    assert bad.returncode == 2 and "has no config.json" in bad.stderr


def test_plan_a_repository(tmp_path):
    for name, tp in (("a", 2), ("b", 1)):
        _cli("make-test-model", "--arch", "llama", "--out", str(tmp_path / name))
        (tmp_path / name / "model.yaml").write_text(f"tp: {tp}\nmax_num_seqs: 2\n")
    out = json.loads(_cli("plan", "--json", "--repository", str(tmp_path), "--devices", "cpu:2",
                          "--device-memory", "64MiB").stdout)
    placed = {m["name"]: m["devices"] for m in out["models"]}
    assert len(placed["a"]) == 2 and len(placed["b"]) == 1
    assert all(d["used"] <= d["budget"] for d in out["devices"])
    bad = _cli("plan", "--repository", str(tmp_path), "--devices", "cpu:2", "--device-memory",
               "1MiB", check=False)
    assert bad.returncode == 2 and "needs" in bad.stderr and "free" in bad.stderr


def test_plan_says_which_kernels_run_a_checkpoint(tmp_path):
    model = tmp_path / "bf16"
    _cli("make-test-model", "--arch", "llama", "--dtype", "bfloat16", "--out", str(model))
    plan = json.loads(_cli("plan", "--json", "--model", str(model), "--devices", "cpu:1").stdout)
    assert plan["dtype"] == "bfloat16" and plan["compute_dtype"] == "float32"
    assert plan["kernels"] == "native-bfloat16/float32" and plan["kv_cache_dtype"] == "bfloat16"
    # the note names the linear kernel this CPU runs (AMX / AVX512-BF16 dot products, or
    # bfloat16 widened in float32 registers)
    assert ops.linear_path("bfloat16") in plan["kernels_note"]
    no_kernels = subprocess.run(
        [sys.executable, "-m", "shardserve.cli.main", "plan", "--json", "--model", str(model),
         "--devices", "cpu:1"], capture_output=True, text=True, timeout=240,
        env={**os.environ, "SHARDSERVE_KERNELS": "0"})
    slow = json.loads(no_kernels.stdout)
    assert slow["kernels"] == "pytorch-bfloat16" and "slower" in slow["kernels_note"]


def test_plan_stages_across_nodes(tmp_path):
    """A model too big for any device of one 2-device node: no plan of one node fits, and
    the plans of two nodes that do put each stage's tp group inside one node, with the bytes
    of each stage (weights, activations and one full-context sequence of KV cache, as the
    engine requires)."""
    from shardserve.config import ModelConfig, ParallelConfig
    from shardserve.planner.memory import weight_bytes_per_device

    model = tmp_path / "m"
    _cli("make-test-model", "--arch", "llama", "--size", "small", "--out", str(model))
    spec = ModelConfig(str(model)).spec
    budget = int(weight_bytes_per_device(spec, 1, "float32") * 0.4)
    # a small step (16 tokens, one sequence): the weights, not the activation reserve, decide
    args = ("plan", "--json", "--model", str(model), "--devices", "cpu:2", "--device-memory",
            str(budget), "--max-num-batched-tokens", "16", "--max-num-seqs", "1")
    one = json.loads(_cli(*args).stdout)
    assert one["chosen"] is None and not any(p["fits"] for p in one["plans"])
    assert one["plans"][0]["stages"][0]["weight_bytes_per_device"] > budget
    two = json.loads(_cli(*args, "--nodes", "2").stdout)
    chosen = two["plans"][two["chosen"]]
    assert chosen["fits"] and chosen["tp"] * chosen["pp"] > 2 and chosen["nodes"] == 2
    assert len(chosen["stages"]) == chosen["pp"]
    # the split the engine would use: its micro-batches of one sequence over the context
    stages = ParallelConfig(chosen["tp"], chosen["pp"]).for_batches(
        spec, 1, spec.max_position).stages(spec)
    for st, row in zip(stages, chosen["stages"], strict=True):
        assert row["layers"] == [st.layers[0], st.layers[-1]] and row["holds"] == st.holds
        assert row["weight_bytes_per_device"] == weight_bytes_per_device(
            spec, chosen["tp"], "float32", stage=st) <= budget
        assert len({d.split("/")[0] for d in row["devices"]}) == 1  # one node per tp group
    assert {d.split("/")[0] for r in chosen["stages"] for d in r["devices"]} == \
        {"node0", "node1"}
    pinned = json.loads(_cli(*args, "--nodes", "2", "--tp", str(chosen["tp"]), "--pp",
                             str(chosen["pp"])).stdout)
    assert [(p["tp"], p["pp"]) for p in pinned["plans"]] == [(chosen["tp"], chosen["pp"])]


def test_the_175b_model_on_12_chip_machines():
    """The seed's case: OPT-175B (the GPT-3 shape) in bfloat16 fits one inf2.48xlarge at
    tp=12 with its KV capacity stated; it does not fit an inf2.24xlarge (6 chips), where two
    of them at tp=6 x pp=2 do."""
    plan = json.loads(_cli("plan", "--json", "--model", "opt-175b", "--hardware", "inf2.48xlarge",
                           "--tp", "12").stdout)
    assert plan["dtype"] == "bfloat16" and plan["hardware_source"].startswith("https://")
    one = plan["plans"][plan["chosen"]]
    assert one["fits"] and one["nodes"] == 1 and one["kv_tokens"] >= 2048
    assert one["bytes_per_device"]["weights"] < 32 << 30
    assert set(one["predicted"]) == {"prefill_ms", "decode_ms", "ttft_ms", "tpot_ms",
                                     "tokens_per_s"}
    assert len(one["stages"][0]["devices"]) == 12
    small = json.loads(_cli("plan", "--json", "--model", "opt-175b", "--hardware",
                            "inf2.24xlarge").stdout)
    assert small["chosen"] is None  # not on one node, whatever the split
    assert small["smallest_hardware"]["total_memory"] >= 350e9
    two = json.loads(_cli("plan", "--json", "--model", "opt-175b", "--hardware", "inf2.24xlarge",
                          "--nodes", "2").stdout)
    chosen = two["plans"][two["chosen"]]
    assert (chosen["tp"], chosen["pp"]) == (6, 2)
    assert {r["node"] for r in chosen["stages"]} == {0, 1}
    # the same for a person: the candidates, the pick, its stages
    table = _cli("plan", "--model", "opt-175b", "--hardware", "inf2.24xlarge",
                 "--nodes", "2").stdout
    assert "TPOT ms" in table and "chosen: tp=6 x pp=2 on 2 node(s)" in table
    refused = _cli("plan", "--model", "opt-175b", "--hardware", "inf2.24xlarge").stdout
    assert "does not fit" in refused and "smallest hardware that fits:" in refused


def test_calibrate_writes_the_local_profile_plan_reads(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "shardserve.cli.main", *a], capture_output=True, text=True,
        timeout=240, env=env, check=True)
    missing = subprocess.run([sys.executable, "-m", "shardserve.cli.main", "plan", "--model",
                              "llama-3-8b", "--hardware", "local"], capture_output=True,
                             text=True, timeout=240, env=env)
    assert missing.returncode == 2 and "run `shardserve calibrate`" in missing.stderr
    out = run("calibrate", "--quick").stdout
    assert "picoseconds a weight by rows" in out and "memory read:" in out
    import yaml

    local = yaml.safe_load((tmp_path / "shardserve/hardware/local.yaml").read_text())
    profile = local["profiles"]["local"]
    one = profile["cpu_splits"][1]
    curve = one["linear_ps_per_weight"]["float32"]
    assert sorted(curve) == [1, 16, 64, 512] and all(v > 0 for v in curve.values())
    assert curve[512] > curve[1]  # more rows, more time a weight
    assert profile["tflops"]["float32"] == round(max(2 * r / ps for r, ps in curve.items()), 4)
    assert set(one["overhead"]["float32"]) == set(cost.OVERHEAD_TERMS)
    assert one["probe_steps"]["float32"]  # the steps the fit came from
    if len(os.sched_getaffinity(0)) >= 2:
        assert profile["cpu_splits"][2]["all_reduce"]["latency_us"] > 0
    assert profile["memory_bandwidth_gib_s"] > 0 and "measured by" in profile["source"]
    plan = json.loads(run("plan", "--json", "--model", "llama-3-8b", "--hardware",
                          "local").stdout)
    assert plan["hardware"] == "local" and plan["predictions_from"].startswith("measured")
    assert any(p["predicted"] for p in plan["plans"])
    # and for the devices of this machine without --hardware
    model = tmp_path / "m"
    run("make-test-model", "--arch", "llama", "--out", str(model))
    mine = json.loads(run("plan", "--json", "--model", str(model), "--devices",
                          "cpu:1").stdout)
    assert mine["plans"][0]["predicted"]["decode_ms"] > 0
