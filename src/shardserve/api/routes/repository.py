"""Repository control (KServe v2 repository extension, as Triton serves it): the index of
loaded models with their state, each device's use, and live load / unload (admin key)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from shardserve.api.auth import Principal, principal, require_admin
from shardserve.api.errors import APIError
from shardserve.config import repository_configs
from shardserve.engine.supervisor import State

router = APIRouter()


@router.get("/v2/repository/index")
async def repository_index(request: Request, who: Principal = Depends(principal)
                           ) -> list[dict]:
    """Each loaded model this caller may see: state (READY, RESTARTING, FAILED), the reason
    of its last failure, and each replica's devices, state and restarts."""
    host = request.app.state.host
    return [row for row in host.index() if row["name"] in host.deployments
            and who.may_use(row["name"], host.deployments[row["name"]].config.tenants)]


@router.get("/v2/repository/devices")
async def devices(request: Request, who: Principal = Depends(require_admin)) -> list[dict]:
    """shardserve extension: each device's budget, bytes planned and models."""
    return request.app.state.host.device_usage()


@router.post("/v2/repository/models/{name}/load")
async def load(name: str, request: Request, who: Principal = Depends(require_admin)) -> dict:
    """Place and start a model of the repository; refused (and nothing changed) if it does
    not fit. A model left FAILED by its restarts is loaded anew. The other models keep
    serving meanwhile."""
    host, repo = request.app.state.host, request.app.state.repository
    dep = host.deployments.get(name)
    if dep is not None and dep.state is not State.FAILED:
        return {"name": name, "state": dep.state.value}
    try:
        configs = {c.name: c for c in repository_configs(repo)} if repo else {}
    except ValueError as e:
        raise APIError(400, f"the repository has an error: {e}") from None
    if name not in configs:
        raise APIError(404, f"no model named {name!r} in the repository")
    limits = request.app.state.limits
    try:
        if dep is not None:
            await asyncio.to_thread(host.unload, name, limits.drain_timeout_s)
        await asyncio.to_thread(host.load, configs[name])
    except (ValueError, KeyError) as e:
        raise APIError(400, f"cannot load {name!r}: {e}") from None
    return {"name": name, "state": "READY"}


@router.post("/v2/repository/models/{name}/unload")
async def unload(name: str, request: Request, who: Principal = Depends(require_admin)
                 ) -> dict:
    """Stop taking requests for the model, let the running ones finish (for the server's
    drain timeout, then end them with 503), free its devices."""
    limits = request.app.state.limits
    try:
        await asyncio.to_thread(request.app.state.host.unload, name, limits.drain_timeout_s)
    except KeyError:
        raise APIError(404, f"model {name!r} is not loaded") from None
    except ValueError as e:
        raise APIError(400, f"cannot unload {name!r}: {e}") from None
    return {"name": name, "state": "UNAVAILABLE"}
