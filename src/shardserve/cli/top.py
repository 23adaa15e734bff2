"""``shardserve top --url URL``: the device map in a terminal, redrawn every second from the
server's ``/v2/status`` (what ``/dashboard`` shows).

Each device is a bar of ``BAR`` columns: a deployment's weights in its capital letter, its KV
cache in the small letter, its activation reserve as ``~``, another tenant's bytes as ``#``,
free memory as ``.``. ``render`` is pure (a status dict in, text out).
"""

from __future__ import annotations

import json
import string
import sys
import time
import urllib.error
import urllib.request

BAR = 40


def fetch(url: str, key: str | None, timeout_s: float = 5.0) -> dict:
    req = urllib.request.Request(url.rstrip("/") + "/v2/status",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _ms(q: dict | None) -> str:
    return "-" if not q or q.get("p50") is None else f"{q['p50']:.1f} / {q['p99']:.1f}"


def render(status: dict, url: str = "") -> str:
    letters = {}
    names = [d["name"] for d in status["deployments"]] + [
        p["deployment"] for dev in status["devices"] for p in dev["parts"] if p["deployment"]]
    for name in names:
        if name not in letters:
            letters[name] = string.ascii_uppercase[len(letters) % 26]
    when = time.strftime("%H:%M:%S", time.localtime(status["time"]))
    out = [f"shardserve  {url}  {len(status['devices'])} devices, "
           f"{len(status['deployments'])} deployments  {when}", ""]
    rows = [["DEVICE", "USED", "BUDGET", "", "MAP"]]
    for dev in status["devices"]:
        cells = ""
        for p in dev["parts"]:
            if p["deployment"] is None:
                pieces = [("#", p["bytes"])]
            else:
                c = letters[p["deployment"]]
                pieces = [(c, p.get("weights", 0)), (c.lower(), p.get("kv_cache", 0)),
                          ("~", p.get("activations", 0))]
            for ch, n in pieces:
                cells += ch * round(BAR * n / dev["budget"])
        cells = cells[:BAR].ljust(BAR, ".")
        share = 100 * dev["used"] / dev["budget"] if dev["budget"] else 0
        rows.append([dev["name"], _bytes(dev["used"]), _bytes(dev["budget"]), f"{share:.0f}%",
                     f"[{cells}]"])
    out += _table(rows)
    if letters:
        out += ["", "  ".join(f"{c} {n}" for n, c in letters.items())
                + "   (capital: weights, small: KV cache, ~: activations, #: another tenant's)"]
    rows = [["MODEL", "KIND", "STATE", "TP x PP", "DEVICES", "RUN", "WAIT", "TOK/S",
             "TTFT p50/p99 ms", "TPOT p50/p99 ms", "KV"]]
    for d in status["deployments"]:
        kv = d.get("kv_cache_usage")
        tps = d.get("tokens_per_s")
        rows.append([d["name"], d.get("kind", "-"), d["state"],
                     f"{d['tp']} x {d['pp']}" if d.get("tp") else "-",
                     " | ".join("+".join(r["devices"]) for r in d.get("replicas", [])) or "-",
                     str(d.get("running", "-")), str(d.get("waiting", "-")),
                     "-" if tps is None else f"{tps:.1f}", _ms(d.get("ttft_ms")),
                     _ms(d.get("tpot_ms")), "-" if kv is None else f"{100 * kv:.0f}%"])
    out += [""] + _table(rows)
    return "\n".join(out)


def run(url: str, key: str | None, interval_s: float = 1.0, once: bool = False) -> int:
    while True:
        try:
            text = render(fetch(url, key), url)
        except urllib.error.HTTPError as e:
            print(f"error: {url} answered {e.code}"
                  + (": pass an API key with --api-key" if e.code in (401, 403) else ""),
                  file=sys.stderr)
            return 2
        except (urllib.error.URLError, OSError) as e:
            print(f"error: cannot reach {url}: {e}", file=sys.stderr)
            return 2
        if once:
            print(text)
            return 0
        sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # home, clear, draw
        sys.stdout.flush()
        try:
            time.sleep(interval_s)
        except KeyboardInterrupt:
            return 0
