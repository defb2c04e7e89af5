"""The operations endpoints: liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

import contextlib
import json

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kiln_runtime import metrics as kiln_metrics

from .bootstrap import Wiring
from .deps import Rt

router = APIRouter()


def _status(problems: list[str], good: str, bad: str) -> Response:
    return Response(
        json.dumps({"status": bad if problems else good, "problems": problems}),
        status_code=503 if problems else 200,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@router.get("/healthz", include_in_schema=False)
async def healthz(request: Request) -> Response:
    """Live: the event loop answers (this is served by it) and the bus is not broken for good."""
    rt: Wiring | None = getattr(request.app.state, "runtime", None)
    problems = list(rt.bus_problems().not_live) if rt is not None else []
    return _status(problems, "ok", "not live")


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> Response:
    """Ready: started, connected to NATS, consuming, and Postgres answers."""
    rt: Wiring | None = getattr(request.app.state, "runtime", None)
    problems = await rt.not_ready() if rt is not None else ["starting or shutting down"]
    return _status(problems, "ready", "not ready")


@router.get("/metrics", include_in_schema=False)
async def metrics(rt: Rt) -> Response:
    with contextlib.suppress(Exception):  # the figure is skipped, not the scrape, if PG is down
        kiln_metrics.BUILDS_SLEEPING.set(await rt.store.count_with_status("sleeping"))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
