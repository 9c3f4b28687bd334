"""Security settings fail loudly at start-up when they cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest

from sessionmgr.common import natsauth
from sessionmgr.common.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JWT_ALGORITHM": "none"}, "JWT_ALGORITHM"),
        ({"JWT_ALGORITHM": "RS256"}, "JWT_JWKS_URL"),
        ({"JWT_JWKS_URL": "https://idp.example/jwks"}, "asymmetric"),
        ({"JWT_ALGORITHM": "ES256", "JWT_JWKS_URL": "ftp://idp.example/jwks"}, "http"),
        ({"NODE_ENV": "production", "JWT_SECRET": "p" * 40, "JWT_ALGORITHM": "RS256", "JWT_JWKS_URL": "http://idp/jwks"}, "https"),
        ({"RATE_LIMIT_PER_MINUTE": "-1"}, "RATE_LIMIT_PER_MINUTE"),
        ({"MAX_SESSIONS_PER_USER": "-5"}, "MAX_SESSIONS_PER_USER"),
        ({"TLS_CERT_FILE": "/nonexistent.pem"}, "TLS_CERT_FILE"),
        ({"NATS_TLS_CA": "/nonexistent-ca.pem"}, "NATS_TLS_CA"),
        ({"DB_TLS": "maybe"}, "DB_TLS"),
        ({"CORS_ALLOW_ORIGINS": "evil.example"}, "CORS_ALLOW_ORIGINS"),
    ],
)
def test_bad_security_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_defaults_are_generous_and_tls_off() -> None:
    s = load_settings({})
    assert s.rate_limit_per_minute >= 6000 and s.create_rate_limit_per_minute >= 600 and s.max_sessions_per_user >= 1000
    assert not s.db_tls and s.tls_cert_file is None and s.cors_origins == []


def test_asymmetric_algorithms_with_jwks(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    s = load_settings({"JWT_ALGORITHM": "ES256", "JWT_JWKS_URL": "https://idp.example/jwks", "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(cert), "CORS_ALLOW_ORIGINS": "https://a.example,https://b.example"})
    assert s.jwt_algorithm == "ES256"
    assert s.cors_origins == ["https://a.example", "https://b.example"]


def test_nats_passwords_default_to_development_values_and_are_overridable() -> None:
    assert natsauth.server_env({})["NATS_WORKER_PASSWORD"] == natsauth.dev_password("worker")
    assert natsauth.server_env({"NATS_WORKER_PASSWORD": "s3cret"})["NATS_WORKER_PASSWORD"] == "s3cret"
    assert natsauth.role_env("gateway", {"NATS_GATEWAY_PASSWORD": "g"}) == {"NATS_USER": "gateway", "NATS_PASSWORD": "g"}
    assert natsauth.inbox_prefix("worker") == "_INBOX_worker"
    assert natsauth.inbox_prefix(None) == "_INBOX"
    assert natsauth.inbox_prefix("we.ird>") == "_INBOX"
