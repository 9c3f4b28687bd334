"""CORS: off unless ``CORS_ALLOW_ORIGINS`` lists the browser origins that may call the API.

Bearer tokens travel in a header, never in cookies, so credentials are never allowed and a
page from another origin cannot ride on a user's session.
"""

from __future__ import annotations

from litestar.config.cors import CORSConfig

from sessionmgr.common.settings import Settings

ALLOWED_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "If-Match", "X-Client-Version", "traceparent", "tracestate"]
EXPOSED_HEADERS = ["ETag", "Location", "Retry-After", "WWW-Authenticate"]


def cors_config(settings: Settings) -> CORSConfig | None:
    origins = settings.cors_origins
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins,
        allow_methods=["GET", "POST", "PUT", "DELETE"],
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        allow_credentials=False,
        max_age=600,
    )
