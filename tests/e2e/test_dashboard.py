"""The device map: /v2/status as each key sees it, /dashboard driven in a real headless
Chromium (selenium; `make setup` installs chromium and chromium-driver), and `shardserve top`
against the running server."""

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.e2e.test_server import _free_port, _start, _stop
from tests.e2e.test_tenants import _call, tenant_repo

pytestmark = pytest.mark.slow
ADMIN, KEY_A, KEY_B = "sk-admin-map", "sk-tenant-a-map", "sk-tenant-b-map"


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    auth, repo = tenant_repo(tmp_path_factory.mktemp("map"), checkpoints,
                             (ADMIN, KEY_A, KEY_B))
    port = _free_port()
    proc = _start(["--repository", str(repo), "--devices", "cpu:2", "--device-memory",
                   "16MiB", "--auth", str(auth)], port)
    yield f"http://127.0.0.1:{port}"
    code = _stop(proc)
    assert code == 0, proc.stdout.read()[-3000:]


def test_status_shows_each_key_what_it_may_see(server):
    assert _call(f"{server}/v2/status")[0] == 401
    _call(f"{server}/v1/completions", ADMIN, {"model": "a-llama", "prompt": "hello there",
                                              "max_tokens": 8})
    status, full = _call(f"{server}/v2/status", ADMIN)
    assert status == 200
    assert sorted(d["name"] for d in full["deployments"]) == ["a-llama", "b-mistral", "c-qwen"]
    a = next(d for d in full["deployments"] if d["name"] == "a-llama")
    assert a["state"] == "READY" and a["tp"] == 2 and len(a["replicas"][0]["devices"]) == 2
    assert a["ttft_ms"]["requests"] >= 1 and a["ttft_ms"]["p50"] > 0
    assert a["tokens_per_s"] > 0
    for device in full["devices"]:
        parts = device["parts"]
        assert sum(p["bytes"] for p in parts) == device["used"] <= device["budget"]
        for p in parts:  # the planner's bytes, by what they hold
            assert p["weights"] + p["kv_cache"] + p["activations"] == p["bytes"]
    _, mine = _call(f"{server}/v2/status", KEY_A)
    assert [d["name"] for d in mine["deployments"]] == ["a-llama"]
    text = json.dumps(mine)
    assert "b-mistral" not in text and "c-qwen" not in text
    # the other tenant's bytes stay on the shared devices, unnamed
    assert [d["used"] for d in mine["devices"]] == [d["used"] for d in full["devices"]]
    assert any(p["deployment"] is None for d in mine["devices"] for p in d["parts"])


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium and chromedriver are missing: make setup installs them "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900"):
        options.add_argument(arg)
    options.binary_location = chromium
    return webdriver.Chrome(options=options, service=Service(driver))


def _open(browser, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{url}/dashboard")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda b: b.find_element(By.ID, "login").is_displayed())
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait.until(lambda b: int(b.find_element(By.TAG_NAME, "body").get_attribute(
        "data-updates") or 0) >= 1)


def _shown(browser) -> tuple[set[str], set[str]]:
    """(deployment rows, deployments with bytes in a device bar) on the page now, read in
    one script: the page redraws each second, so elements found in one call may be gone by
    the next."""
    rows, parts = browser.execute_script(
        "const names = sel => Array.from(document.querySelectorAll(sel), e => e.dataset);"
        "return [names('tr[data-deployment]').map(d => d.deployment),"
        "        names('.seg[data-part]').map(d => d.part)];")
    return set(rows), set(parts)


def _count(browser, selector: str) -> int:
    return browser.execute_script(f"return document.querySelectorAll('{selector}').length")


def test_the_page_shows_a_tenant_only_its_own_models(server):

    browser = _browser()
    try:
        _open(browser, server, KEY_A)
        rows, parts = _shown(browser)
        assert rows == {"a-llama"} and parts == {"a-llama"}
        assert _count(browser, ".seg.occupied") > 0
        source = browser.page_source
        assert "b-mistral" not in source and "c-qwen" not in source
    finally:
        browser.quit()


def test_the_page_follows_an_unload_and_a_load_without_reloading(server):

    browser = _browser()
    try:
        _open(browser, server, ADMIN)
        rows, parts = _shown(browser)
        assert rows == parts == {"a-llama", "b-mistral", "c-qwen"}
        assert browser.execute_script(
            "return Array.from(document.querySelectorAll('[data-device]'),"
            " e => e.dataset.device)") == ["cpu:0", "cpu:1"]
        browser.execute_script("window.sameDocument = true")
        assert _call(f"{server}/v2/repository/models/c-qwen/unload", ADMIN, {},
                     method="POST")[0] == 200
        t0 = time.monotonic()
        while "c-qwen" in set().union(*_shown(browser)):
            assert time.monotonic() - t0 < 2.5, "the unload did not show within 2 s"
            time.sleep(0.1)
        assert browser.execute_script("return window.sameDocument") is True  # no reload
        assert _shown(browser) == ({"a-llama", "b-mistral"}, {"a-llama", "b-mistral"})
        assert _call(f"{server}/v2/repository/models/c-qwen/load", ADMIN, {},
                     method="POST")[0] == 200
        t0 = time.monotonic()
        while _shown(browser) != ({"a-llama", "b-mistral", "c-qwen"},) * 2:
            assert time.monotonic() - t0 < 2.5, "the load did not show within 2 s"
            time.sleep(0.1)
        assert browser.execute_script("return window.sameDocument") is True
    finally:
        browser.quit()


def test_top_draws_the_servers_map(server):
    out = subprocess.run([sys.executable, "-m", "shardserve.cli.main", "top", "--url", server,
                          "--api-key", ADMIN, "--once"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("cpu:0") for line in lines)
    assert any(line.startswith("a-llama") and "READY" in line for line in lines)
    refused = subprocess.run([sys.executable, "-m", "shardserve.cli.main", "top", "--url",
                              server, "--once"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "--api-key" in refused.stderr
    with urllib.request.urlopen(f"{server}/dashboard", timeout=10) as r:  # the page itself
        assert b"device map" in r.read()
