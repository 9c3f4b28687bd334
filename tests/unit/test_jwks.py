"""The JWKS key cache: refetch on an unknown kid at most once per interval, rotation, bad keys skipped."""

from __future__ import annotations

from typing import Any

import pytest

from sessionmgr.gateway.jwks import JwksCache, signing_keys
from tests.support.security import ec_key, public_jwk, rsa_key

RSA_A, RSA_B, EC = rsa_key(), rsa_key(), ec_key()


class FakeIdp:
    def __init__(self, *keys: dict[str, Any]) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self.fail = False

    def __call__(self, url: str) -> dict[str, Any]:
        self.fetches += 1
        if self.fail:
            raise OSError("identity provider unreachable")
        return {"keys": list(self.keys)}


async def test_unknown_kid_refetches_at_most_once_per_interval() -> None:
    idp = FakeIdp(public_jwk(RSA_A, "a", "RS256"))
    cache = JwksCache("https://idp.test/jwks", "RS256", min_refresh=3600, fetch=idp)
    await cache.ensure("a")
    assert cache.key_for("a") is not None
    for kid in ("x", "y", "z", "a"):
        await cache.ensure(kid)
    assert idp.fetches == 1
    assert cache.key_for("x") is None


async def test_rotated_key_is_found_after_the_interval() -> None:
    idp = FakeIdp(public_jwk(RSA_A, "a", "RS256"))
    cache = JwksCache("https://idp.test/jwks", "RS256", min_refresh=0, fetch=idp)
    await cache.ensure("b")
    assert cache.key_for("b") is None
    idp.keys.append(public_jwk(RSA_B, "b", "RS256"))
    await cache.ensure("b")
    assert cache.key_for("b") is not None
    assert idp.fetches == 2


async def test_failed_fetch_keeps_the_keys_it_had() -> None:
    idp = FakeIdp(public_jwk(RSA_A, "a", "RS256"))
    cache = JwksCache("https://idp.test/jwks", "RS256", min_refresh=0, max_age=0, fetch=idp)
    await cache.ensure("a")
    idp.fail = True
    await cache.ensure("a")  # stale (max_age 0): tries, fails, keeps
    assert cache.key_for("a") is not None


@pytest.mark.parametrize(
    "jwk",
    [
        pytest.param({**public_jwk(RSA_A, "k", "RS256"), "use": "enc"}, id="encryption-key"),
        pytest.param({**public_jwk(RSA_A, "k", "RS256"), "alg": "RS512"}, id="other-alg"),
        pytest.param(public_jwk(EC, "k", "ES256"), id="ec-key-for-rs256"),
        pytest.param({"kty": "oct", "k": "c2VjcmV0", "kid": "k"}, id="symmetric-key"),
        pytest.param({"kty": "RSA", "kid": "k", "e": "AQAB"}, id="malformed"),
        pytest.param("not-a-dict", id="not-an-object"),
    ],
)
def test_unusable_keys_are_skipped(jwk: Any) -> None:
    assert signing_keys({"keys": [jwk]}, "RS256") == {}


def test_a_published_private_key_is_refused() -> None:
    from jwt.algorithms import RSAAlgorithm

    private = RSAAlgorithm.to_jwk(RSA_A, as_dict=True)
    assert "d" in private
    assert signing_keys({"keys": [{**private, "kid": "k"}]}, "RS256") == {}


def test_token_without_kid_uses_the_only_key() -> None:
    cache = JwksCache("https://idp.test/jwks", "RS256")
    cache._keys = signing_keys({"keys": [public_jwk(RSA_A, "a", "RS256")]}, "RS256")
    assert cache.key_for(None) is not None
    cache._keys = signing_keys({"keys": [public_jwk(RSA_A, "a", "RS256"), public_jwk(RSA_B, "b", "RS256")]}, "RS256")
    assert cache.key_for(None) is None
