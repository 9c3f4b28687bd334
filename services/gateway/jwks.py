"""Public keys from the identity provider's JWKS URL, fetched off the event loop and cached.

The gateway never blocks on the network while verifying a token: before a token is verified
:meth:`JwksCache.ensure` makes sure the key its ``kid`` names is at hand (a fetch runs in a thread),
then verification itself only looks keys up. An unknown ``kid`` triggers a refetch at most once
per ``min_refresh`` seconds, so tokens with made-up key IDs cannot turn the gateway into a
load generator against the identity provider; keys are refetched after ``max_age`` anyway (key
rotation) and the old set is kept when a fetch fails.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import jwt
import structlog

log = structlog.get_logger(__name__)

MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT_S = 5.0
# Which JWK key type an algorithm needs: an RSA key never verifies an ES256 token and so on.
_KTY_FOR = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


def fetch_jwks(url: str) -> dict[str, Any]:
    """Blocking HTTP GET of a JWKS document (run it in a thread)."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "session-manager-gateway"})
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - http(s) only, checked in settings
        body = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError("JWKS document too large")
    document = json.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    return document


def signing_keys(document: dict[str, Any], algorithm: str) -> dict[str | None, Any]:
    """``kid`` -> public key for every usable key of the document that fits ``algorithm``."""
    keys: dict[str | None, Any] = {}
    wanted_kty = _KTY_FOR.get(algorithm[:2])
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        if jwk.get("use", "sig") != "sig" or jwk.get("alg", algorithm) != algorithm or jwk.get("kty") != wanted_kty:
            continue
        if "d" in jwk:  # a private key published by mistake: refuse to use it
            continue
        try:
            key = jwt.PyJWK(jwk, algorithm=algorithm).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        kid = jwk.get("kid")
        keys[kid if isinstance(kid, str) else None] = key
    return keys


class JwksCache:
    def __init__(
        self,
        url: str,
        algorithm: str,
        *,
        min_refresh: float = 30.0,
        max_age: float = 300.0,
        fetch: Callable[[str], dict[str, Any]] = fetch_jwks,
    ) -> None:
        self._url = url
        self._algorithm = algorithm
        self._min_refresh = min_refresh
        self._max_age = max_age
        self._fetch = fetch
        self._keys: dict[str | None, Any] = {}
        self._loaded_at = float("-inf")
        self._attempted_at = float("-inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    def key_for(self, kid: str | None) -> Any | None:
        """The key for ``kid``; a token without ``kid`` may use the only key of the set."""
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def _fresh(self, kid: str | None) -> bool:
        return self.key_for(kid) is not None and time.monotonic() - self._loaded_at < self._max_age

    async def ensure(self, kid: str | None) -> None:
        """Fetch the key set if ``kid`` is unknown or the set is old, at most once per ``min_refresh``."""
        if self._fresh(kid):
            return
        async with self._lock:
            if self._fresh(kid) or time.monotonic() - self._attempted_at < self._min_refresh:
                return
            self._attempted_at = time.monotonic()
            self.fetches += 1
            try:
                document = await asyncio.to_thread(self._fetch, self._url)
                keys = signing_keys(document, self._algorithm)
            except Exception as exc:  # noqa: BLE001 - keep the keys we have; tokens fail until it answers
                log.warning("jwks_fetch_failed", url=self._url, error=type(exc).__name__, detail=str(exc)[:200])
                return
            self._keys = keys
            self._loaded_at = time.monotonic()
            log.info("jwks_loaded", url=self._url, keys=len(keys))
