"""Bearer-token authentication (JWT HS256) and the caller's identity.

Verified tokens are cached (bounded, until their ``exp``) because HMAC verification plus claim
checks cost more than the rest of a cached request; a revoked secret needs a restart anyway.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import jwt
import msgspec

from sessionmgr.common.errors import AuthenticationError
from sessionmgr.common.ids import is_valid_user_id
from sessionmgr.common.settings import Settings

ADMIN_SCOPE = "sessions:admin"
READ_SCOPE = "sessions:read"
WRITE_SCOPE = "sessions:write"
_CACHE_MAX = 10_000
_LEEWAY_S = 30


class Principal(msgspec.Struct, frozen=True):
    user_id: str
    scopes: frozenset[str]
    # A token without a scope claim is an ordinary user with full rights over their own sessions.
    scoped: bool

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    @property
    def can_read(self) -> bool:
        return not self.scoped or bool(self.scopes & {READ_SCOPE, WRITE_SCOPE, ADMIN_SCOPE})

    @property
    def can_write(self) -> bool:
        return not self.scoped or self.is_admin or WRITE_SCOPE in self.scopes


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self._secret = settings.jwt_secret
        self._algorithms = [settings.jwt_algorithm]
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError("missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Authorization must be 'Bearer <token>'")
        cached = self._cache.get(token)
        now = time.time()
        if cached is not None and cached[1] > now:
            return cached[0]
        principal, expires = self._verify(token)
        self._cache[token] = (principal, expires)
        if len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)
        return principal

    def _verify(self, token: str) -> tuple[Principal, float]:
        if len(token) > 8192:
            raise AuthenticationError("token too large")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=_LEEWAY_S,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not is_valid_user_id(sub):
            raise AuthenticationError("token 'sub' must be 1-128 printable characters without whitespace")
        scope = claims.get("scope")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        return Principal(user_id=sub, scopes=scopes, scoped=isinstance(scope, str)), float(claims["exp"]) + _LEEWAY_S


def mint_token(secret: str, user_id: str, *, ttl_s: int = 24 * 3600, scope: str | None = None) -> str:
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm="HS256")
