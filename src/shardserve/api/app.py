"""The FastAPI application: protocol routers over a ModelHost."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST

from shardserve.api.auth import Auth
from shardserve.api.errors import APIError, api_error_handler, error_body, validation_handler
from shardserve.api.metrics import Metrics
from shardserve.api.routes import kserve, openai
from shardserve.config import ServerLimits

if TYPE_CHECKING:
    from shardserve.engine.host import ModelHost


def create_app(host: ModelHost, auth: Auth | None = None, repository: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """``auth`` None: no keys (the CLI then binds loopback only) and no repository control."""
    limits = limits or ServerLimits()
    app = FastAPI(title="shardserve", docs_url=None, redoc_url=None)
    app.state.host, app.state.auth, app.state.repository = host, auth, repository
    app.state.limits, app.state.metrics = limits, Metrics(host)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.include_router(openai.router)
    app.include_router(kserve.router)
    return app


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, by Content-Length or while streaming in."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > self.max_bytes:
            return await self._refuse(scope, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, send)

    async def _refuse(self, scope, send) -> None:
        body = json.dumps(error_body(scope["path"], 413, f"request body is over "
                                     f"{self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
