"""``shardserve`` command line. Flags for config fields come from the dataclasses' fields and
their ``help`` metadata, so defaults and docs live in one place (``shardserve.config``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path

from shardserve.config import (
    CacheConfig,
    DeploymentConfig,
    DeviceConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    ServerLimits,
)

_SHORT = {"tensor_parallel_size": "--tp", "tp": "--tensor-parallel-size",  # vLLM's spellings
          "pipeline_parallel_size": "--pp", "pp": "--pipeline-parallel-size"}


def _int_or_word(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _add_fields(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + ([_SHORT[f.name]] if f.name in _SHORT else [])
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # "int | None" -> int; "int | str" -> 2 or auto
            options = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = _int_or_word if set(options) == {int, str} else options[0]
        required = f.default is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=f.metadata.get("help"))
            continue
        parser.add_argument(*names, dest=f.name, type=kind, required=required,
                            default=None if required else f.default, help=f.metadata.get("help"))


def _build(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if hasattr(args, f.name)})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text offline from one or more prompts")
    g.add_argument("--model", dest="path", required=True, help=ModelConfig.__dataclass_fields__[
        "path"].metadata["help"])
    _add_fields(g, ModelConfig, skip=("path",))
    _add_fields(g, ParallelConfig)
    _add_fields(g, DeviceConfig)
    _add_fields(g, CacheConfig)
    _add_fields(g, SchedulerConfig)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")

    pl = sub.add_parser("plan", help="bytes per device for a model at a tp, or the placement "
                                     "of a whole repository, from config.json alone")
    what = pl.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", dest="path", help="a model folder, or a preset: "
                                                   "opt-175b, llama-2-70b, llama-3-8b, "
                                                   "mixtral-8x7b")
    what.add_argument("--repository")
    _add_fields(pl, ModelConfig, skip=("path",))
    pl.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int,
                    help="pin the tensor-parallel size (default: list every one that splits)")
    pl.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int,
                    help="pin the pipeline depth (default: list every one that fills the "
                         "devices)")
    pl.add_argument("--pipeline-split", help="with --pp: layers of each stage, e.g. 5,3 or 7.5,4.5")
    _add_fields(pl, DeviceConfig)
    _add_fields(pl, SchedulerConfig)
    op = pl.add_argument_group("the operating point predicted, and the SLOs a plan must meet")
    op.add_argument("--concurrency", type=int, default=1, help="requests in flight, over all "
                                                               "replicas")
    op.add_argument("--batch", type=int, help="sequences a replica decodes per step "
                                               "(default: the concurrency shared by the "
                                               "replicas, up to max_num_seqs and the KV cache)")
    op.add_argument("--prompt-len", type=int, default=512)
    op.add_argument("--output-len", type=int, default=128)
    op.add_argument("--slo-ttft-ms", type=float, help="time to first token at most this")
    op.add_argument("--slo-tpot-ms", type=float, help="time per output token at most this")
    pl.add_argument("--json", action="store_true", help="print JSON (for tools) instead of "
                                                         "a table")
    pl.add_argument("--hardware", help="plan for a hardware profile's nodes instead of "
                                       "--devices (e.g. inf2.48xlarge, h100-8x; see "
                                       "shardserve/data/hardware/)")
    pl.add_argument("--nodes", type=int, default=1,
                    help="machines, each with --devices: pipeline stages may span them, a "
                         "tensor-parallel group stays inside one")

    cal = sub.add_parser("calibrate", help="measure this machine (linear layers by weight "
                                           "format and rows, all-reduce, engine time per "
                                           "step, memory bandwidth) into the hardware "
                                           "profile `local` (minutes)")
    cal.add_argument("--out", help="where to write it (default: "
                                   "~/.cache/shardserve/hardware/local.yaml)")
    cal.add_argument("--quick", action="store_true", help="small shapes, short runs (tests)")

    sv = sub.add_parser("serve", help="serve a model repository (or one model) over HTTP")
    src = sv.add_mutually_exclusive_group()
    src.add_argument("--repository", help="folder of model folders, each with a model.yaml; "
                                          "default: the embedded demo repository")
    src.add_argument("--model", help="serve this one model folder")
    sv.add_argument("--name", "--served-model-name", dest="name",
                    help="with --model: the name clients use (default: folder name)")
    one = sv.add_argument_group("with --model: the model.yaml fields, as flags")
    _add_fields(one, DeploymentConfig, skip=("name", "path", "tenants", "preferred_batch_sizes"))
    _add_fields(sv, DeviceConfig)
    sv.add_argument("--auth", help="YAML file of hashed API keys, tenants and their models "
                                   "(see shardserve.api.auth); required to bind beyond loopback")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind; without --auth, "
                                                        "loopback only")
    sv.add_argument("--port", type=int, default=8000)
    _add_fields(sv, ServerLimits)

    t = sub.add_parser("top", help="the device map of a running server in the terminal "
                                   "(what /dashboard shows), redrawn every second")
    t.add_argument("--url", default="http://127.0.0.1:8000")
    t.add_argument("--api-key", help="a key, when the server runs with --auth (an admin's "
                                     "sees every model, a tenant's its own)")
    t.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    t.add_argument("--once", action="store_true", help="print the map once and exit")

    b = sub.add_parser("bench", help="streaming load against a server's completions endpoint")
    b.add_argument("--url", default="http://127.0.0.1:8000")
    b.add_argument("--model", required=True)
    load = b.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="Poisson arrivals per second")
    load.add_argument("--concurrency", type=int, help="requests kept in flight")
    b.add_argument("--num-requests", type=int, default=100)
    b.add_argument("--prompt-len", type=int, default=64, help="prompt length in words")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--api-key")
    b.add_argument("--out", help="write the summary here as JSON")
    b.add_argument("--plot", help="write latency histograms here as PNG")
    b.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --url (only against servers you run)")

    hk = sub.add_parser("hash-key", help="print the digest of an API key for the --auth file "
                                         "(a new random key when none is given)")
    hk.add_argument("key", nargs="?")

    m = sub.add_parser("make-test-model", help="write a random-weight checkpoint of a real "
                                               "architecture (deterministic from --seed)")
    m.add_argument("--arch", default="llama",
                   choices=["llama", "mistral", "qwen2", "bert", "dlrm", "whisper"])
    m.add_argument("--size", default="tiny",
                   choices=["tiny", "small", "llama-110m", "tinyllama", "openai-tiny",
                            "openai-base"])
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--max-shard-size", default=None, help="split into files of this size")
    m.add_argument("--skip-existing", action="store_true",
                   help="do nothing if --out already holds a config.json")
    return p


def _generate(args: argparse.Namespace) -> None:
    from shardserve.llm import LLM
    from shardserve.sampling_params import SamplingParams

    params = SamplingParams(n=args.n, max_tokens=args.max_tokens,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    configs = (ModelConfig, DeviceConfig, CacheConfig, SchedulerConfig)
    fields = {f.name for cls in configs for f in dataclasses.fields(cls)} - {"path", "devices"}
    with LLM(args.path, args.tensor_parallel_size, args.devices,
             pipeline_parallel_size=args.pipeline_parallel_size,
             pipeline_split=args.pipeline_split, executor=args.executor,
             ray_address=args.ray_address,
             **{name: getattr(args, name) for name in fields}) as llm:
        for out in llm.generate(args.prompt, params):
            for c in out.outputs:
                print(json.dumps({"prompt": out.prompt, "index": c.index, "text": c.text,
                                  "token_ids": c.token_ids, "finish_reason": c.finish_reason}))


def _plan(args: argparse.Namespace) -> None:
    import os
    import types

    from shardserve.planner import search
    from shardserve.planner.hardware import local_rates, profile
    from shardserve.planner.partition import parse_split
    from shardserve.planner.presets import PRESETS, preset
    from shardserve.runtime.devices import parse_devices
    from shardserve.runtime.precision import Precision, choose

    if args.repository:
        return _plan_repository(args)
    if args.nodes < 1:
        raise ValueError(f"--nodes {args.nodes}: must be >= 1")
    sched = _build(SchedulerConfig, args)
    target = search.Target(args.concurrency, args.batch, args.prompt_len, args.output_len,
                           args.slo_ttft_ms, args.slo_tpot_ms)
    if args.hardware:
        hardware = profile(args.hardware)
        nodes = search.Nodes(tuple(f"{hardware.kind}:{i}"
                                   for i in range(hardware.devices_per_node)),
                             hardware.memory_per_device, args.nodes, hardware.rates)
        source = ("measured on this machine by `shardserve calibrate`" if hardware.cpu_splits
                  else "the vendor's peak FLOP/s and bandwidths (a roofline: a lower bound, "
                       "no per-step overhead measured)")
    else:
        hardware, devices = None, parse_devices(args.devices, args.device_memory)
        measured = devices[0].kind == "cpu" and local_rates(1) is not None
        nodes = search.Nodes(tuple(d.name for d in devices), devices[0].memory_budget,
                             args.nodes, local_rates if measured else (lambda n: None))
        source = ("measured on this machine by `shardserve calibrate`" if measured else
                  "none: run `shardserve calibrate` (or pass --hardware) for predictions")
    if not os.path.isdir(args.path) and args.path in PRESETS:
        spec = preset(args.path)
        model = types.SimpleNamespace(path=args.path, spec=spec, is_encoder=False)
    else:
        model = _build(ModelConfig, args)
        spec = model.spec
    ParallelConfig(args.tp or 1, args.pp or 1, args.pipeline_split).check_model(spec)
    if hardware is not None or isinstance(model, types.SimpleNamespace):
        dtype = spec.dtype if args.dtype == "auto" else args.dtype
        where = f"{hardware.name} ({hardware.device})" if hardware else "these devices"
        precision = Precision(dtype, dtype, "planned", f"weights, activations and KV cache "
                              f"in {dtype}, as planned for {where}", args.quantization)
    else:
        precision = choose(model, nodes.devices[0].split(":")[0])
    context = args.max_model_len or spec.max_position
    plans = search.candidates(spec, nodes, precision, sched, target, context, args.tp,
                              args.pp, parse_split(args.pipeline_split))
    chosen = search.choose(plans)
    out = {"model": model.path, "architecture": spec.architecture,
           "hardware": hardware.name if hardware else None,
           "hardware_source": hardware.source if hardware else None,
           "nodes": args.nodes, "devices_per_node": nodes.per_node,
           "budget_per_device": nodes.budget,
           "dtype": precision.weights, "compute_dtype": precision.compute,
           "kv_cache_dtype": precision.kv, "quantization": precision.quantization,
           "kernels": precision.label, "kernels_note": precision.note,
           "context_tokens": context, "operating_point": dataclasses.asdict(target),
           "predictions_from": source, "plans": plans, "chosen": chosen}
    if not any(p["fits"] for p in plans):
        out["smallest_hardware"] = search.smallest_hardware(spec, precision, sched, target,
                                                            context, args.nodes)
    print(json.dumps(out, indent=2) if args.json else _plan_table(out))


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])]
                     + [line(r) for r in cells[1:]])


def _span(devices: list[str]) -> str:
    """``node0/neuron:0 .. neuron:5`` for a run of devices."""
    if len(devices) <= 2:
        return " ".join(devices) or "-"
    return f"{devices[0]} .. {devices[-1].split('/')[-1]}"


def _plan_table(out: dict) -> str:
    """``shardserve plan`` for a person: the candidate plans with their bytes and predicted
    speed, the pick, and the pick's stages."""
    from shardserve.planner.memory import format_bytes as fb

    where = out["hardware"] or f"{out['devices_per_node']} device(s)"
    op = out["operating_point"]
    slo = ", ".join(f"{k} <= {op[f'slo_{k}_ms']:g} ms" for k in ("ttft", "tpot")
                    if op[f"slo_{k}_ms"] is not None) or "none"
    lines = [f"{out['model']} ({out['architecture']}), {out['kernels']}, on {out['nodes']} x "
             f"{where}; budget {fb(out['budget_per_device'])} a device",
             f"operating point: {op['prompt_len']} tokens in, {op['output_len']} out, "
             f"{op['concurrency']} in flight; SLOs: {slo}",
             f"predictions from: {out['predictions_from']}", ""]
    ms = lambda p, k: f"{p['predicted'][k]:,.1f}" if p["predicted"] else "-"  # noqa: E731
    rows = []
    for i, p in enumerate(out["plans"]):
        b = p["bytes_per_device"]
        verdict = ("no" if not p["fits"] else "yes" if p["meets_slo"] is not False
                   else "misses SLO")
        rows.append(["*" if i == out["chosen"] else "", p["tp"], p["pp"], p["nodes"] or "-",
                     p["replicas"], fb(b["weights"]), fb(b["kv"]), fb(b["activations"]),
                     f"{p['kv_tokens']:,}", p["batch"] or "-", ms(p, "ttft_ms"),
                     ms(p, "tpot_ms"), ms(p, "tokens_per_s"), verdict])
    lines.append(_table(["", "tp", "pp", "nodes", "replicas", "weights", "KV", "activations",
                         "KV tokens", "batch", "TTFT ms", "TPOT ms", "tok/s", "fits"], rows))
    lines.append("")
    if out["chosen"] is None:
        fitting = [p for p in out["plans"] if p["fits"]]
        if fitting:
            lines.append("no plan meets the SLOs: relax them, or add devices")
        else:
            why = {p.get("why") for p in out["plans"]}
            lines.append("does not fit: " + "; ".join(sorted(w for w in why if w)))
            best = out.get("smallest_hardware")
            lines.append(f"smallest hardware that fits: {best['nodes']} x {best['hardware']} "
                         f"at tp={best['tp']} x pp={best['pp']}" if best else
                         "no known hardware fits it")
        return "\n".join(lines)
    p = out["plans"][out["chosen"]]
    lines.append(f"chosen: tp={p['tp']} x pp={p['pp']} on {p['nodes']} node(s), "
                 f"{p['replicas']} replica(s)")
    rows = [[r["stage"], r["holds"], r.get("node", "-"),
             _span(r.get("devices", [])), fb(r["weight_bytes_per_device"]),
             fb(r["activation_bytes_per_device"]), f"{r['kv_tokens_that_fit']:,}"]
            for r in p["stages"]]
    lines.append(_table(["stage", "layers", "node", "devices", "weights", "activations",
                         "KV tokens"], rows))
    return "\n".join(lines)


def _plan_repository(args: argparse.Namespace) -> None:
    from shardserve.config import repository_configs
    from shardserve.engine.host import resolve_tp
    from shardserve.planner.memory import format_bytes
    from shardserve.planner.placement import Plan, place
    from shardserve.runtime.devices import parse_devices
    from shardserve.runtime.precision import choose

    devices = parse_devices(args.devices, args.device_memory)
    needs, labels = [], {}
    plan = Plan({d.name: d.memory_budget for d in devices})
    for c in repository_configs(args.repository):  # in the order the server loads them
        model = c.model_config()
        precision = choose(model, devices[0].kind)
        c, need = resolve_tp(c, model, precision, plan)
        replicas = [dataclasses.replace(need, name=f"{c.name}/{i}") for i in range(c.replicas)]
        place(plan.budgets, replicas, plan)
        needs += replicas
        labels[c.name] = precision.label
    if not args.json:
        from shardserve.planner.memory import format_bytes as fb

        print(_table(["model", "replica", "tp", "pp", "devices", "per device", "kernels"],
                     [[n.name.rsplit("/", 1)[0], n.name.rsplit("/", 1)[1], n.tp, n.pp,
                       " ".join(plan.assigned[n.name]), fb(n.bytes_per_device),
                       labels[n.name.rsplit("/", 1)[0]]] for n in needs]))
        print()
        print(_table(["device", "budget", "used"],
                     [[d, fb(b), fb(plan.used(d))] for d, b in plan.budgets.items()]))
        return
    print(json.dumps({
        "models": [{"name": n.name.rsplit("/", 1)[0], "replica": int(n.name.rsplit("/", 1)[1]),
                    "tp": n.tp, "pp": n.pp, "devices": plan.assigned[n.name],
                    "kernels": labels[n.name.rsplit("/", 1)[0]],
                    "bytes_per_device": n.bytes_per_device,
                    "per_device": format_bytes(n.bytes_per_device)} for n in needs],
        "devices": [{"device": d, "budget": b, "used": plan.used(d)}
                    for d, b in plan.budgets.items()]}, indent=2))


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die of
        the signal; a finished graceful shutdown is a clean exit (status 0)."""

        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT,
                                                                   signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    return Server


def _serve(args: argparse.Namespace) -> None:
    import ipaddress
    import logging
    from pathlib import Path

    import uvicorn

    from shardserve import test_models
    from shardserve.api.app import create_app
    from shardserve.api.auth import Auth
    from shardserve.api.http import protocol

    _Server = _server_class()
    from shardserve.config import repository_configs
    from shardserve.engine.host import ModelHost
    from shardserve.runtime.devices import parse_devices

    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = _build(ServerLimits, args)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    auth = Auth.from_file(args.auth) if args.auth else None
    if not loopback and auth is None:
        raise ValueError(f"refusing to bind {args.host} without --auth: with no API keys, "
                         "shardserve serves only on loopback (127.0.0.1 or ::1)")
    if args.model:
        args.path = str(Path(args.model).resolve())
        args.name = args.name or Path(args.model).name
        if args.kind == "llm":  # the default: serve the folder as what its config.json says
            args.kind = ModelConfig(args.path).kind
        configs = [_build(DeploymentConfig, args)]
    else:
        repo = args.repository or str(test_models.write_repository(_cache_dir() / "repository"))
        configs = repository_configs(repo)
    repo = None if args.model else repo
    pipelines = []
    if repo:
        from shardserve.engine.pipeline import PipelineConfig

        pipelines = [PipelineConfig.from_folder(str(p.parent))
                     for p in sorted(Path(repo).glob("*/pipeline.yaml"))]
    host = ModelHost(parse_devices(args.devices, args.device_memory))
    try:
        if args.devices.startswith("cpu"):
            from shardserve import kernels

            ready, detail = kernels.status()
            print(f"native CPU kernels: {'ready' if ready else 'UNAVAILABLE'}: {detail}",
                  flush=True)
        for cfg in configs:
            dep = host.load(cfg)
            where = "; ".join(", ".join(r.devices) for r in dep.replicas)
            print(f"loaded {cfg.name} on {where}: {dep.precision.label}", flush=True)
        for pipe in pipelines:
            host.add_pipeline(pipe)
            print(f"pipeline {pipe.name}: {' -> '.join(s.name for s in pipe.steps)}",
                  flush=True)
        url = f"http://{args.host}:{args.port}"
        print(f"shardserve listening on {url}\ntry:", flush=True)
        for line in _try_lines(url, host):
            print(f"  {line}", flush=True)
        app = create_app(host, auth, repo, limits, loopback_only=loopback)
        _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                               http=protocol(limits.header_timeout_s, limits.max_connections),
                               timeout_graceful_shutdown=30)).run()
    finally:
        host.shutdown(limits.drain_timeout_s)


def _cache_dir() -> Path:
    """Where ``serve`` keeps what it writes itself (the default repository, samples)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardserve"


def _try_lines(url: str, host) -> list[str]:
    """A curl line for each loaded model and pipeline that it answers as is."""
    def v2(name: str, inputs: list[dict]) -> str:
        return (f"curl {url}/v2/models/{name}/infer -H 'Content-Type: application/json' -d "
                f"'{json.dumps({'inputs': inputs})}'")

    from shardserve import test_models

    lines = []
    samples = _cache_dir() / "samples"
    for dep in host.deployments.values():
        name = dep.config.name
        if dep.kind == "recommender":  # one sample: id 0 of every table
            spec = dep.model.spec
            lines.append(v2(name, [
                {"name": "dense", "datatype": "FP32", "shape": [1, spec.dense_in_features],
                 "data": [0.5] * spec.dense_in_features},
                {"name": "sparse_values", "datatype": "INT64", "shape": [spec.num_tables],
                 "data": [0] * spec.num_tables},
                {"name": "sparse_lengths", "datatype": "INT32", "shape": [spec.num_tables, 1],
                 "data": [1] * spec.num_tables}]))
            continue
        if dep.speech is not None:  # a WAV file of speech, written for trying it
            lines.append(f"curl {url}/v1/audio/transcriptions -F model={name} "
                         f"-F file=@{test_models.sample_speech(samples / 'speech.wav')}")
            continue
        route, body = (("embeddings", {"input": "The quick brown fox"}) if dep.is_encoder
                       else ("completions", {"prompt": "The quick brown fox",
                                             "max_tokens": 16}))
        lines.append(f"curl {url}/v1/{route} -H 'Content-Type: application/json' -d "
                     f"'{json.dumps({'model': name, **body})}'")
    asks = {"recommend": "boots for a mountain hike", "route": "will it rain tomorrow"}
    for name, pipe in host.pipelines.items():
        if pipe.config.takes_audio:  # the same speech, as an infer body in a file
            body = test_models.sample_infer_request(
                test_models.sample_speech(samples / "speech.wav"), samples / f"{name}.json")
            lines.append(f"curl {url}/v2/models/{name}/infer -H 'Content-Type: "
                         f"application/json' -d @{body}")
            continue
        lines.append(v2(name, [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                                "data": [asks.get(name, "hello there")]}]))
    return lines


def _bench(args: argparse.Namespace) -> None:
    from shardserve.bench import http_load

    summary = http_load.run(args.url, args.model, args.num_requests, args.rate,
                            args.concurrency, args.prompt_len, args.max_tokens, args.seed,
                            args.api_key, allow_remote=args.allow_remote)
    if args.plot:
        http_load.plot(summary, args.plot)
    summary.pop("_raw")
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def _hash_key(args: argparse.Namespace) -> None:
    import secrets

    from shardserve.api.auth import hash_key

    key = args.key or "sk-" + secrets.token_urlsafe(32)
    if not args.key:
        print(f"key (give it to the client, keep it nowhere else): {key}")
    print(hash_key(key))


def _make_test_model(args: argparse.Namespace) -> None:
    from pathlib import Path

    from shardserve import test_models
    from shardserve.planner.memory import parse_bytes

    if args.skip_existing and (Path(args.out) / "config.json").is_file():
        print(f"{args.out} exists; kept")
        return
    shard = parse_bytes(args.max_shard_size) if args.max_shard_size else None
    out = test_models.write(args.out, args.arch, args.size, args.seed, args.dtype, shard)
    print(f"wrote {args.arch}/{args.size} (random weights, seed {args.seed}) to {out}")


def _calibrate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from shardserve.bench.calibrate import calibrate
    from shardserve.planner.hardware import local_profile_path

    out = Path(args.out) if args.out else local_profile_path()
    p = calibrate(out, args.quick)
    for n, split in p["cpu_splits"].items():
        curves = split["linear_ps_per_weight"]
        rows_seen = next(iter(curves.values()))
        print(f"cpu:{n} ({split['threads']} thread(s) a device): linear layers, picoseconds a "
              "weight by rows")
        print(_table(["weights", *(str(r) for r in rows_seen)],
                     [[f, *(f"{v:.1f}" for v in c.values())] for f, c in curves.items()]))
        if "all_reduce" in split:
            ar = split["all_reduce"]
            print(f"all-reduce: {ar['latency_us']} us + {ar['gib_s']} GiB/s")
        for dtype, terms in split["overhead"].items():
            print(f"engine time ({dtype} checkpoints): " +
                  ", ".join(f"{k} {v:g}" for k, v in terms.items()))
        print()
    print(f"memory read: {p['memory_bandwidth_gib_s']} GiB/s")
    print(f"wrote {out} (profile `local`: shardserve plan --hardware local)")


def _top(args: argparse.Namespace) -> int:
    from shardserve.cli import top

    return top.run(args.url, args.api_key, args.interval, args.once)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = {"generate": _generate, "plan": _plan, "serve": _serve, "bench": _bench,
                "hash-key": _hash_key, "calibrate": _calibrate, "top": _top,
                "make-test-model": _make_test_model}[args.command](args)
        if code:
            return code
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
