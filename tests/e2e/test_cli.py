"""The command line as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

from shardserve.kernels import ops

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
    assert plan["tp"] == 2 and plan["fits"] and plan["weight_bytes_per_device"] > 0
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


def test_plan_stages_across_nodes_and_the_smallest_plan_that_fits(tmp_path):
    """A model too big for any device of one 2-device node: the plan at tp=1 says so and
    names the smallest tp x pp that fits on two such nodes (weights, activations and one
    full-context sequence of KV cache, as the engine requires); that plan puts each stage's
    tp group inside one node, with the bytes of each stage."""
    from shardserve.config import ModelConfig, ParallelConfig
    from shardserve.planner.memory import weight_bytes_per_device

    model = tmp_path / "m"
    _cli("make-test-model", "--arch", "llama", "--size", "small", "--out", str(model))
    spec = ModelConfig(str(model)).spec
    budget = int(weight_bytes_per_device(spec, 1, "float32") * 0.4)
    # a small step (16 tokens, one sequence): the weights, not the activation reserve, decide
    args = ("plan", "--json", "--model", str(model), "--devices", "cpu:2", "--device-memory",
            str(budget), "--nodes", "2", "--max-num-batched-tokens", "16", "--max-num-seqs", "1")
    plan = json.loads(_cli(*args).stdout)
    assert not plan["fits"] and plan["stages"][0]["weight_bytes_per_device"] > budget
    best = plan["smallest_that_fits"]
    assert best is not None and best["tp"] * best["pp"] > 2 and best["nodes_used"] == 2
    chosen = json.loads(_cli(*args, "--tp", str(best["tp"]), "--pp", str(best["pp"])).stdout)
    assert chosen["fits"] and len(chosen["stages"]) == best["pp"]
    stages = ParallelConfig(best["tp"], best["pp"]).stages(spec)
    for st, row in zip(stages, chosen["stages"], strict=True):
        assert row["layers"] == [st.start, st.stop - 1]
        assert row["weight_bytes_per_device"] == weight_bytes_per_device(
            spec, best["tp"], "float32", stage=st) <= budget
        assert len({d.split("/")[0] for d in row["devices"]}) == 1  # one node per tp group
    nodes = {d.split("/")[0] for d in chosen["devices"]}
    assert nodes == {"node0", "node1"}


def test_the_175b_model_on_12_chip_machines():
    """The seed's case: OPT-175B (the GPT-3 shape) in bfloat16 fits one inf2.48xlarge at
    tp=12 with its KV capacity stated; it does not fit an inf2.24xlarge (6 chips), where two
    of them at tp=6 x pp=2 are the smallest plan that does."""
    plan = json.loads(_cli("plan", "--json", "--model", "opt-175b", "--hardware", "inf2.48xlarge",
                           "--tp", "12").stdout)
    assert plan["fits"] and plan["dtype"] == "bfloat16" and plan["nodes_used"] == 1
    stage = plan["stages"][0]
    assert stage["weight_bytes_per_device"] < 32 << 30 and stage["kv_tokens_that_fit"] >= 2048
    assert len(plan["devices"]) == 12 and plan["hardware_source"].startswith("https://")
    small = json.loads(_cli("plan", "--json", "--model", "opt-175b", "--hardware", "inf2.24xlarge",
                            "--tp", "6").stdout)
    assert not small["fits"] and small["smallest_that_fits"] is None  # not on one node
    two = json.loads(_cli("plan", "--json", "--model", "opt-175b", "--hardware", "inf2.24xlarge",
                          "--tp", "6", "--nodes", "2").stdout)
    assert not two["fits"]  # tp=6 alone: 54 GiB a chip
    assert two["smallest_that_fits"]["tp"] == 6 and two["smallest_that_fits"]["pp"] == 2
    split = json.loads(_cli("plan", "--json", "--model", "opt-175b", "--hardware",
                            "inf2.24xlarge", "--tp", "6", "--pp", "2", "--nodes", "2").stdout)
    assert split["fits"] and {r["node"] for r in split["stages"]} == {0, 1}
    # the same for a person: a table of the stages and the verdict
    table = _cli("plan", "--model", "opt-175b", "--hardware", "inf2.24xlarge", "--tp", "6",
                 "--nodes", "2").stdout
    assert table.splitlines()[2].split()[:2] == ["stage", "layers"]
    assert "does not fit" in table and "smallest plan that fits: tp=6 x pp=2 on 2 node" in table


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
    assert "linear-layer TFLOP/s by rows" in out and "memory read:" in out
    import yaml

    local = yaml.safe_load((tmp_path / "shardserve/hardware/local.yaml").read_text())
    profile = local["profiles"]["local"]
    curve = profile["tflops_by_rows"]["float32"]
    assert sorted(curve) == [1, 16, 64, 256, 512] and all(v > 0 for v in curve.values())
    assert profile["tflops"]["float32"] == max(curve.values())
    assert profile["memory_bandwidth_gib_s"] > 0 and "measured by" in profile["source"]
    plan = json.loads(run("plan", "--json", "--model", "llama-3-8b", "--hardware",
                          "local").stdout)
    assert plan["hardware"] == "local" and plan["stages"][0]["weight_bytes_per_device"] > 0
