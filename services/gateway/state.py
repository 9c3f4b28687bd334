"""What the gateway's handlers share, built once per app."""

from __future__ import annotations

from dataclasses import dataclass

from sessionmgr.common.settings import Settings
from sessionmgr.gateway.auth import TokenVerifier
from sessionmgr.gateway.ratelimit import RateLimiter
from sessionmgr.gateway.workers import WorkerClient


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    verifier: TokenVerifier
    workers: WorkerClient
    limiter: RateLimiter | None = None
