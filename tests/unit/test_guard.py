"""The request guard in front of every route: Host and Origin checks, JSON bodies only, body
size and body deadline."""

import asyncio

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from shardserve.api.errors import APIError, api_error_handler
from shardserve.api.guard import RequestGuard


def _client(loopback_only=True, origins=frozenset(), body_timeout_s=5.0):
    app = FastAPI()
    app.add_exception_handler(APIError, api_error_handler)
    app.add_middleware(RequestGuard, max_bytes=100, body_timeout_s=body_timeout_s,
                       origins=origins, loopback_only=loopback_only)

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.body())}

    return TestClient(app, base_url="http://localhost:8000")


def test_local_host_names_pass_and_others_are_refused():
    client = _client()
    assert client.post("/v1/echo", json={}).status_code == 200
    for host in ("127.0.0.1:8000", "[::1]:8000", "localhost"):
        assert client.post("/v1/echo", json={}, headers={"Host": host}).status_code == 200
    r = client.post("/v1/echo", json={}, headers={"Host": "attacker.example:8000"})
    assert r.status_code == 403 and "localhost" in r.json()["error"]["message"]
    public = _client(loopback_only=False)
    assert public.post("/v1/echo", json={}, headers={"Host": "api.example"}).status_code == 200


def test_browser_origins_are_refused_unless_allowed():
    client = _client(origins=frozenset({"https://app.example"}))
    assert client.post("/v1/echo", json={}, headers={"Origin": "https://evil.example"}
                       ).status_code == 403
    assert client.post("/v1/echo", json={}, headers={"Origin": "https://app.example"}
                       ).status_code == 200


def test_only_json_bodies():
    client = _client()
    r = client.post("/v1/echo", content=b'{"a": 1}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert client.post("/v1/echo", content=b"{}", headers={
        "Content-Type": "application/json; charset=utf-8"}).status_code == 200
    assert client.post("/v1/echo", content=b"{}").status_code == 200  # no type: tritonclient
    # raw bytes only as KServe's binary tensors: with the header that sizes their JSON part
    octet = {"Content-Type": "application/octet-stream"}
    assert client.post("/v1/echo", content=b"{}", headers=octet).status_code == 415
    assert client.post("/v1/echo", content=b"{}", headers={
        **octet, "Inference-Header-Content-Length": "2"}).status_code == 200


def test_body_limit_by_header_and_while_streaming():
    client = _client()
    assert client.post("/v1/echo", content=b"x" * 101,
                       headers={"Content-Type": "application/json"}).status_code == 413

    def chunks():
        for _ in range(5):
            yield b"x" * 30

    r = client.post("/v1/echo", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_body_that_never_finishes_gets_408():
    guard = RequestGuard(None, max_bytes=100, body_timeout_s=0.1, origins=frozenset(),
                         loopback_only=True)

    async def app(scope, receive, send):
        await receive()
        await receive()  # the rest never comes

    guard.app = app
    sent = []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.sleep(10)

    out = []

    async def send(message):
        out.append(message)

    scope = {"type": "http", "path": "/v1/x", "headers": [(b"host", b"localhost")]}
    asyncio.run(guard(scope, receive, send))
    assert out[0]["status"] == 408


@pytest.mark.parametrize("path,shape", [("/v1/x", dict), ("/v2/x", str)])
def test_refusals_take_the_protocol_shape(path, shape):
    client = _client()
    r = client.post(path, json={}, headers={"Host": "evil"})
    assert isinstance(r.json()["error"], shape)
