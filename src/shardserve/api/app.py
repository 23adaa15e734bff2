"""The FastAPI application: protocol routers over a ModelHost."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from shardserve.api.auth import Auth
from shardserve.api.errors import APIError, api_error_handler, validation_handler
from shardserve.api.routes import kserve, openai

if TYPE_CHECKING:
    from shardserve.engine.host import ModelHost


def create_app(host: ModelHost, auth: Auth | None = None,
               repository: str | None = None) -> FastAPI:
    """``auth`` None: no keys (the CLI then binds loopback only) and no repository control."""
    app = FastAPI(title="shardserve", docs_url=None, redoc_url=None)
    app.state.host, app.state.auth, app.state.repository = host, auth, repository
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.include_router(openai.router)
    app.include_router(kserve.router)
    return app
