"""JWT verification at the gateway: HS256 with the shared secret, RS256/ES256 from a JWKS URL.

Every refusal is a 401 problem with ``WWW-Authenticate: Bearer``: ``alg: none``, algorithm
confusion (HS256 keyed with the RSA public key), an unknown ``kid``, a foreign key, a tampered
payload, expired / not-yet-valid tokens, wrong issuer or audience.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_api import assert_problem
from tests.support.cluster import TEST_JWT_SECRET, Cluster
from tests.support.security import (
    JwksServer,
    claims,
    ec_key,
    forge_hs256,
    gateway_client,
    jwks_server,
    public_jwk,
    public_pem,
    rsa_key,
    sign,
    tamper,
    unsigned,
)

RSA_KEY = rsa_key()
EC_KEY = ec_key()
OTHER_RSA_KEY = rsa_key()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_401(resp: httpx.Response) -> None:
    assert_problem(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"].startswith("Bearer"), resp.headers


@pytest.fixture(scope="module")
def rsa_jwks() -> Iterator[JwksServer]:
    with jwks_server(public_jwk(RSA_KEY, "rsa-1", "RS256"), public_jwk(EC_KEY, "ec-1", "ES256")) as server:
        yield server


@pytest.fixture(scope="module")
async def rs256_api(cluster: Cluster, rsa_jwks: JwksServer) -> AsyncIterator[httpx.AsyncClient]:
    settings = cluster.settings.with_overrides(jwt_algorithm="RS256", jwt_jwks_url=rsa_jwks.url, jwt_issuer="https://idp.test/", jwt_audience="session-manager")
    async with gateway_client(settings) as client:
        yield client


def rs256(user: str, **extra: Any) -> str:
    return sign(claims(user, iss="https://idp.test/", aud="session-manager", **extra), RSA_KEY, "RS256", kid="rsa-1")


async def test_rs256_token_from_jwks_is_accepted(rs256_api: httpx.AsyncClient) -> None:
    user = f"idp-{uuid.uuid4().hex[:8]}"
    created = await rs256_api.post("/sessions", json={}, headers=bearer(rs256(user)))
    assert created.status_code == 201, created.text
    assert created.json()["user_id"] == user
    got = await rs256_api.get(f"/sessions/{created.json()['session_id']}", headers=bearer(rs256(user)))
    assert got.status_code == 200


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda: unsigned(claims("mallory", iss="https://idp.test/", aud="session-manager")), id="alg-none"),
        pytest.param(lambda: forge_hs256(claims("mallory", iss="https://idp.test/", aud="session-manager"), public_pem(RSA_KEY), kid="rsa-1"), id="hs256-keyed-with-rsa-public-key"),
        pytest.param(lambda: forge_hs256(claims("mallory", iss="https://idp.test/", aud="session-manager"), TEST_JWT_SECRET.encode()), id="hs256-with-the-shared-secret"),
        pytest.param(lambda: sign(claims("mallory", iss="https://idp.test/", aud="session-manager"), RSA_KEY, "RS256", kid="no-such-key"), id="unknown-kid"),
        pytest.param(lambda: sign(claims("mallory", iss="https://idp.test/", aud="session-manager"), OTHER_RSA_KEY, "RS256", kid="rsa-1"), id="foreign-key-known-kid"),
        pytest.param(lambda: sign(claims("mallory", iss="https://idp.test/", aud="session-manager"), EC_KEY, "ES256", kid="ec-1"), id="es256-when-rs256-is-pinned"),
        pytest.param(lambda: tamper(rs256("alice"), sub="mallory"), id="tampered-payload"),
        pytest.param(lambda: tamper(rs256("alice"), scope="sessions:admin"), id="tampered-scope"),
        pytest.param(lambda: rs256("alice", exp=int(time.time()) - 120), id="expired"),
        pytest.param(lambda: rs256("alice", nbf=int(time.time()) + 600), id="not-before-in-future"),
        pytest.param(lambda: rs256("alice", iat=int(time.time()) + 600), id="issued-in-future"),
        pytest.param(lambda: sign({"sub": "alice", "iss": "https://idp.test/", "aud": "session-manager"}, RSA_KEY, "RS256", kid="rsa-1"), id="no-exp"),
        pytest.param(lambda: sign(claims("alice", iss="https://evil.test/", aud="session-manager"), RSA_KEY, "RS256", kid="rsa-1"), id="wrong-issuer"),
        pytest.param(lambda: sign(claims("alice", iss="https://idp.test/", aud="someone-else"), RSA_KEY, "RS256", kid="rsa-1"), id="wrong-audience"),
        pytest.param(lambda: sign(claims("alice"), RSA_KEY, "RS256", kid="rsa-1"), id="no-issuer-no-audience"),
        pytest.param(lambda: "not.a.jwt", id="garbage"),
    ],
)
async def test_bad_rs256_tokens_are_401(rs256_api: httpx.AsyncClient, make_token: Any) -> None:
    token = make_token()
    assert_401(await rs256_api.get("/sessions", headers=bearer(token)))
    assert_401(await rs256_api.post("/sessions", json={}, headers=bearer(token)))


async def test_unknown_kids_do_not_hammer_the_identity_provider(rs256_api: httpx.AsyncClient, rsa_jwks: JwksServer) -> None:
    assert (await rs256_api.get("/sessions", headers=bearer(rs256("kid-user")))).status_code == 200
    before = rsa_jwks.fetches
    for i in range(20):
        token = sign(claims("mallory", iss="https://idp.test/", aud="session-manager"), RSA_KEY, "RS256", kid=f"made-up-{i}")
        assert_401(await rs256_api.get("/sessions", headers=bearer(token)))
    assert rsa_jwks.fetches - before <= 1  # one refresh at most per minimum interval (30 s)


async def test_es256_tokens_from_jwks(cluster: Cluster, rsa_jwks: JwksServer) -> None:
    settings = cluster.settings.with_overrides(jwt_algorithm="ES256", jwt_jwks_url=rsa_jwks.url)
    async with gateway_client(settings) as api:
        good = sign(claims("es-user"), EC_KEY, "ES256", kid="ec-1")
        assert (await api.get("/sessions", headers=bearer(good))).status_code == 200
        # The RSA key of the same set never verifies an ES256-pinned gateway's tokens.
        assert_401(await api.get("/sessions", headers=bearer(sign(claims("es-user"), RSA_KEY, "RS256", kid="rsa-1"))))
        assert_401(await api.get("/sessions", headers=bearer(unsigned(claims("es-user")))))
        assert_401(await api.get("/sessions", headers=bearer(tamper(good, sub="someone-else"))))


async def test_jwks_unreachable_is_401_not_500(cluster: Cluster) -> None:
    with jwks_server() as server:
        url = server.url
    settings = cluster.settings.with_overrides(jwt_algorithm="RS256", jwt_jwks_url=url)  # nothing listens there now
    async with gateway_client(settings) as api:
        assert_401(await api.get("/sessions", headers=bearer(sign(claims("u"), RSA_KEY, "RS256", kid="rsa-1"))))


# ---- HS256 (the shared secret) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda: unsigned(claims("mallory")), id="alg-none"),
        pytest.param(lambda: tamper(sign(claims("alice"), TEST_JWT_SECRET, "HS256"), sub="mallory"), id="tampered-payload"),
        pytest.param(lambda: sign(claims("alice"), "another-secret-0123456789abcdef-012345", "HS256"), id="wrong-secret"),
        pytest.param(lambda: sign(claims("alice", exp=int(time.time()) - 120), TEST_JWT_SECRET, "HS256"), id="expired"),
        pytest.param(lambda: sign(claims("alice", nbf=int(time.time()) + 600), TEST_JWT_SECRET, "HS256"), id="not-before-in-future"),
        pytest.param(lambda: sign(claims("alice"), TEST_JWT_SECRET, "HS512"), id="hs512-when-hs256-is-pinned"),
        pytest.param(lambda: sign(claims("alice"), RSA_KEY, "RS256", kid="rsa-1"), id="rs256-when-hs256-is-pinned"),
    ],
)
async def test_bad_hs256_tokens_are_401(api: httpx.AsyncClient, make_token: Any) -> None:
    assert_401(await api.get("/sessions", headers=bearer(make_token())))


async def test_small_clock_skew_is_tolerated(api: httpx.AsyncClient) -> None:
    token = sign(claims("skewed", nbf=int(time.time()) + 5, iat=int(time.time()) + 5), TEST_JWT_SECRET, "HS256")
    assert (await api.get("/sessions", headers=bearer(token))).status_code == 200
