"""What every HTTP request passes before any route: an ASGI middleware.

- **Host** (servers bound to loopback only): the Host header must name this machine
  (``localhost``, ``127.0.0.1``, ``[::1]``), else 403, so a web page on another name that
  resolves to 127.0.0.1 (DNS rebinding) cannot reach the API.
- **Origin**: browsers send one with every cross-site request; any origin not listed in
  ``allowed_origins`` gets 403, so a web page cannot make the user's browser call the API
  (programmatic clients send no Origin).
- **Content-Type**: a body must be JSON: another declared type is 415 (a body without one is
  read as JSON, as tritonclient sends it), except ``application/octet-stream`` with an
  ``Inference-Header-Content-Length`` header (KServe's binary tensors: JSON, then raw data).
  Browsers send neither a custom header nor that type without a CORS preflight, which the
  Origin check refuses. The audio uploads (``/v1/audio/*``) are ``multipart/form-data``, as
  OpenAI's API has them: a type a browser form may send without a preflight, but with an
  Origin header, which the Origin check refuses.
- **Body**: over ``max_body_bytes`` is 413 (``max_audio_bytes`` for audio uploads and binary
  tensors), by Content-Length or while it streams in; a body that has not fully arrived
  ``body_timeout_s`` after the request began is 408.

Errors are in the shape of the path's protocol and never echo the request.
"""

from __future__ import annotations

import asyncio
import json
import time

from shardserve.api.errors import APIError, error_body

_LOCAL_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}


class RequestGuard:
    def __init__(self, app, max_bytes: int, body_timeout_s: float, origins: frozenset[str],
                 loopback_only: bool, max_audio_bytes: int | None = None) -> None:
        self.app, self.max_bytes, self.body_timeout_s = app, max_bytes, body_timeout_s
        self.origins, self.loopback_only = origins, loopback_only
        self.max_audio_bytes = max_audio_bytes or max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        audio = scope["path"].startswith(AUDIO_PREFIX)
        limit = self.max_audio_bytes if audio or _binary(headers) else self.max_bytes
        refusal = self._check_headers(headers, audio, limit)
        if refusal is not None:
            return await _refuse(scope, send, *refusal)
        deadline = time.monotonic() + self.body_timeout_s
        seen, complete = 0, False

        async def guarded_receive():
            nonlocal seen, complete
            if complete:  # after the body only a disconnect can come: no deadline
                return await receive()
            try:  # asyncio.timeout: wait_for can drop a cancellation (api/admission.within)
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within "
                                    f"{self.body_timeout_s:.0f}s") from None
            seen += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if seen > limit:
                raise APIError(413, f"request body is over {limit} bytes")
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracked_send)
        except APIError as e:  # raised from receive outside a route's error handling
            if not started:
                await _refuse(scope, send, e.status, e.message)

    def _check_headers(self, headers: dict[bytes, bytes], audio: bool,
                       limit: int) -> tuple[int, str] | None:
        if self.loopback_only and _host_name(headers.get(b"host", b"")) not in _LOCAL_NAMES:
            return 403, ("this server answers only requests addressed to localhost, "
                         "127.0.0.1 or [::1]")
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1").rstrip("/") not in self.origins:
            return 403, ("cross-origin browser requests are not allowed; list the origin in "
                         "--allowed-origins")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return 413, f"request body is over {limit} bytes"
        if audio:
            if _media(headers) != "multipart/form-data":
                return 415, ("an audio upload is a form: send Content-Type: multipart/form-data "
                             "with the file in the field `file`")
            return None
        if b"content-type" in headers and int(length or b"1") > 0 \
                and _media(headers) != "application/json" and not _binary(headers):
            return 415, "the request body must be JSON: send Content-Type: application/json"
        return None


AUDIO_PREFIX = "/v1/audio/"


def _media(headers: dict[bytes, bytes]) -> str:
    """The body's media type, without parameters ("" when none is declared)."""
    return headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()


def _binary(headers: dict[bytes, bytes]) -> bool:
    """KServe's binary tensor extension: JSON, then raw data."""
    return _media(headers) == "application/octet-stream" and \
        b"inference-header-content-length" in headers


def _host_name(host: bytes) -> str:
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):  # [::1]:8000
        return text.split("]")[0] + "]"
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


async def _refuse(scope, send, status: int, message: str) -> None:
    body = json.dumps(error_body(scope["path"], status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
