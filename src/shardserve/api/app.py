"""The FastAPI application: protocol routers over a ModelHost, behind the request guard."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST

from shardserve.api.auth import Auth, Principal, principal
from shardserve.api.errors import APIError, api_error_handler, validation_handler
from shardserve.api.guard import RequestGuard
from shardserve.api.metrics import Metrics
from shardserve.api.routes import audio, kserve, openai, repository, status
from shardserve.config import ServerLimits

if TYPE_CHECKING:
    from shardserve.engine.host import ModelHost

_POOL_THREADS = 4  # tokenizing and chat templates, off the event loop


def create_app(host: ModelHost, auth: Auth | None = None, repository_dir: str | None = None,
               limits: ServerLimits | None = None, loopback_only: bool = True) -> FastAPI:
    """``auth`` None: no keys (the CLI then binds loopback only) and no repository control.
    ``loopback_only``: the server listens on loopback, so only local Host names are served."""
    limits = limits or ServerLimits()
    pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="api-cpu")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="shardserve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.host, app.state.auth, app.state.repository = host, auth, repository_dir
    app.state.limits, app.state.metrics, app.state.pool = limits, Metrics(host), pool
    app.add_middleware(RequestGuard, max_bytes=limits.max_body_bytes,
                       body_timeout_s=limits.body_timeout_s, origins=limits.origins,
                       loopback_only=loopback_only, max_audio_bytes=limits.max_audio_bytes)

    @app.get("/metrics")
    async def metrics(request: Request, who: Principal = Depends(principal)) -> Response:
        """Prometheus text. With --auth it needs a key: an admin sees every series, a
        tenant only its own models'."""
        visible = None
        if request.app.state.auth is not None and not who.admin:
            deployments = request.app.state.host.deployments

            def visible(name: str) -> bool:
                dep = deployments.get(name)
                return dep is not None and who.may_use(name, dep.config.tenants)
        return Response(app.state.metrics.render(visible), media_type=CONTENT_TYPE_LATEST)

    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.include_router(openai.router)
    app.include_router(audio.router)
    app.include_router(kserve.router)
    app.include_router(repository.router)
    app.include_router(status.router)
    return app
