"""The device map: ``GET /v2/status`` (JSON) and ``GET /dashboard`` (a page that shows it,
refreshed every second).

``/v2/status`` is ``ModelHost.status`` (each device's budget and the bytes each replica
placed on it holds: weights, KV cache, activation reserve; each deployment's state,
parallelism, devices and load) plus each deployment's last minute of requests (TTFT and TPOT
p50/p99, tokens/s: ``api/metrics.Recent``). With ``--auth`` an admin key sees everything and
a tenant's key its own deployments only: another's bytes on a shared device stay in the bar,
unnamed, so the device reads as full as it is. Without ``--auth`` the server is loopback-only
and every caller sees everything.

``/dashboard`` is one HTML file shipped in the package (no CDN, no build step): it asks for
an API key when the server wants one (kept in the tab's session storage) and redraws from
``/v2/status`` each second without reloading.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from shardserve.api.auth import Principal, principal

router = APIRouter()


@router.get("/v2/status")
async def status(request: Request, who: Principal = Depends(principal)) -> dict:
    host, recent = request.app.state.host, request.app.state.metrics.recent
    raw = host.status()

    def visible(name: str) -> bool:
        dep = host.deployments.get(name)
        tenants = dep.config.tenants if dep is not None else ()
        return who.may_use(name, tenants)

    deployments = []
    for row in raw["deployments"]:
        if not visible(row["name"]):
            continue
        if row.get("kind") in ("llm", "speech"):
            row |= recent.summary(row["name"])
        deployments.append(row)
    for device in raw["devices"]:
        device["parts"] = [p if visible(p["deployment"]) else
                           {"deployment": None, "bytes": p["bytes"]} for p in device["parts"]]
    return {"time": time.time(), "auth": request.app.state.auth is not None,
            "devices": raw["devices"], "deployments": deployments}


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-store"})


@cache
def _page() -> str:
    return (Path(__file__).parents[2] / "static" / "dashboard.html").read_text()
