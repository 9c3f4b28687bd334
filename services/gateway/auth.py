"""Bearer-token authentication (JWT) and the caller's identity.

Two modes, pinned by ``JWT_ALGORITHM``: HS256 (or HS384/HS512) with the shared ``JWT_SECRET``,
or an asymmetric algorithm (RS256, ES256, ...) with public keys from ``JWT_JWKS_URL``. Only the
configured algorithm is accepted, so ``alg: none`` and algorithm confusion (an HS256 token
"signed" with the RSA public key) fail. ``exp`` and ``sub`` are required, ``nbf`` and ``iat`` are
honoured with a small leeway, ``iss``/``aud`` are checked when configured.

Verified tokens are cached (bounded, until their ``exp``) because signature verification plus claim
checks cost more than the rest of a cached request; a revoked secret needs a restart anyway.
Tokens are never logged: error details name the failed check, never the token.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import jwt
import msgspec

from sessionmgr.common.errors import AuthenticationError
from sessionmgr.common.ids import is_valid_user_id
from sessionmgr.common.settings import Settings
from sessionmgr.gateway.jwks import JwksCache

ADMIN_SCOPE = "sessions:admin"
READ_SCOPE = "sessions:read"
WRITE_SCOPE = "sessions:write"
_CACHE_MAX = 10_000
_LEEWAY_S = 30
_MAX_TOKEN_CHARS = 8192


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


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationError("missing Authorization: Bearer <token> header")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Authorization must be 'Bearer <token>'")
    return token


def _unverified_kid(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        return None
    return kid if isinstance(kid, str) and len(kid) <= 256 else None


class TokenVerifier:
    def __init__(self, settings: Settings, *, jwks: JwksCache | None = None) -> None:
        self._jwks = jwks
        if self._jwks is None and settings.jwt_jwks_url:
            self._jwks = JwksCache(settings.jwt_jwks_url, settings.jwt_algorithm)
        # The shared secret verifies tokens only in HS mode; with JWKS it is never a verification key.
        self._secret = None if self._jwks is not None else settings.jwt_secret
        self._algorithms = [settings.jwt_algorithm]
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    async def prepare(self, authorization: str | None) -> None:
        """JWKS mode: make sure the key the token names is loaded (fetched in a thread, rate limited).

        Never raises for a bad token; :meth:`authenticate` then gives the precise 401.
        """
        if self._jwks is None or not authorization:
            return
        _, _, token = authorization.partition(" ")
        token = token.strip()
        if not token or len(token) > _MAX_TOKEN_CHARS or token in self._cache:
            return
        await self._jwks.ensure(_unverified_kid(token))

    def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
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
        if len(token) > _MAX_TOKEN_CHARS:
            raise AuthenticationError("token too large")
        key: object = self._secret
        if self._jwks is not None:
            key = self._jwks.key_for(_unverified_kid(token))
            if key is None:
                raise AuthenticationError("invalid token: unknown signing key (kid)")
        try:
            claims = jwt.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=_LEEWAY_S,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None, "verify_iat": True, "verify_nbf": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("token not valid yet (nbf or iat in the future)") from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not is_valid_user_id(sub):
            raise AuthenticationError("token 'sub' must be 1-128 printable characters without whitespace")
        scope = claims.get("scope")
        if scope is None:
            scopes, scoped = frozenset(), False
        elif isinstance(scope, str):  # RFC 8693: space-separated
            scopes, scoped = frozenset(scope.split()), True
        elif isinstance(scope, list) and all(isinstance(item, str) for item in scope):  # some IdPs send an array
            scopes, scoped = frozenset(scope), True
        else:
            # Never let an unreadable scope claim fall back to "unscoped" (full rights).
            raise AuthenticationError("token 'scope' must be a space-separated string or a list of strings")
        return Principal(user_id=sub, scopes=scopes, scoped=scoped), float(claims["exp"]) + _LEEWAY_S


def mint_token(secret: str, user_id: str, *, ttl_s: int = 24 * 3600, scope: str | None = None) -> str:
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl_s}
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm="HS256")
