"""Take docs/dashboard.png: the device map of `make serve`'s default repository (on two
devices of 1 GiB each, so the bars show their share), after a few requests so the latency
columns have numbers, in headless Chromium.

    .venv/bin/python docs/screenshot.py [--out docs/dashboard.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.test_dashboard import _browser  # noqa: E402
from tests.e2e.test_server import _free_port, _start, _stop  # noqa: E402


def _post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=300).read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    args = ap.parse_args()
    port = _free_port()
    proc = _start(["--devices", "cpu:2", "--device-memory", "1GiB"], port)  # the default
    url = f"http://127.0.0.1:{port}"
    try:
        prompts = [f"Request {i}: the quick brown fox" for i in range(12)]
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda p: _post(f"{url}/v1/completions", {
                "model": "demo-llama-random", "prompt": p, "max_tokens": 48}), prompts))
        browser = _browser()
        try:
            browser.get(f"{url}/dashboard")
            t0 = time.monotonic()
            while int(browser.find_element("tag name", "body").get_attribute("data-updates")
                      or 0) < 2 and time.monotonic() - t0 < 20:
                time.sleep(0.2)
            browser.set_window_size(1400, 560)
            time.sleep(1.5)  # a redraw at the new size
            browser.save_screenshot(args.out)
        finally:
            browser.quit()
    finally:
        _stop(proc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
