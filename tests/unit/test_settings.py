"""Settings: the seed's defaults, parsing from an environment mapping, and loud failures."""

from __future__ import annotations

import pytest

from sessionmgr.common.settings import DEV_JWT_SECRET, ENV_VARS, Settings, SettingsError, load_settings

GOOD_SECRET = "s" * 32


def test_defaults_match_the_seed() -> None:
    s = load_settings({})
    assert s.env == "development"
    assert s.db_host == "localhost"
    assert s.db_port == 6379
    assert s.session_ttl == 3600
    assert s.worker_count == 4
    assert s.port == 3000
    assert s.shard_count == 64
    assert s.jwt_secret == DEV_JWT_SECRET
    assert s == Settings()


def test_load_settings_reads_only_the_given_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PORT", "7000")
    assert load_settings({}).db_port == 6379


def test_env_vars_are_parsed() -> None:
    s = load_settings(
        {
            "NODE_ENV": "test",
            "DB_HOST": "redis.internal",
            "DB_PORT": "6380",
            "SESSION_TTL": "120",
            "WORKER_COUNT": "8",
            "PORT": "8080",
            "SHARD_COUNT": "128",
            "NATS_URL": "tls://nats.internal:4222",
            "HEARTBEAT_INTERVAL": "0.25",
            "LOG_FORMAT": "json",
            "OTEL_SERVICE_NAME": "sm-test",
        }
    )
    assert s.env == "test"
    assert s.db_host == "redis.internal"
    assert s.db_port == 6380
    assert s.session_ttl == 120
    assert s.worker_count == 8
    assert s.port == 8080
    assert s.shard_count == 128
    assert s.nats_url == "tls://nats.internal:4222"
    assert s.heartbeat_interval == 0.25
    assert s.log_format == "json"
    assert s.service_name == "sm-test"
    assert s.redis_url == "redis://redis.internal:6380/0"


def test_empty_values_mean_unset() -> None:
    assert load_settings({"DB_PORT": "", "JWT_SECRET": ""}) == Settings()


def test_every_env_var_names_a_field() -> None:
    fields = set(Settings.__struct_fields__)
    assert set(ENV_VARS.values()) <= fields
    assert len(set(ENV_VARS.values())) == len(ENV_VARS)


def test_app_env_aliases_node_env() -> None:
    assert load_settings({"APP_ENV": "test"}).env == "test"
    assert load_settings({"APP_ENV": "production", "JWT_SECRET": GOOD_SECRET}).env == "production"
    # NODE_ENV wins when both are set.
    assert load_settings({"APP_ENV": "production", "NODE_ENV": "test"}).env == "test"


@pytest.mark.parametrize(("short", "full"), [("dev", "development"), ("prod", "production")])
def test_short_environment_names(short: str, full: str) -> None:
    assert load_settings({"NODE_ENV": short, "JWT_SECRET": GOOD_SECRET}).env == full


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("DB_PORT", "abc"),
        ("DB_PORT", "70000"),
        ("DB_PORT", "0"),
        ("PORT", "-1"),
        ("SESSION_TTL", "0"),
        ("SESSION_TTL", "soon"),
        ("HEARTBEAT_MISSES", "1"),
        ("HEARTBEAT_INTERVAL", "0"),
        ("NATS_URL", "http://x"),
        ("SHARD_COUNT", "0"),
        ("SHARD_COUNT", "5000"),
        ("WORKER_COUNT", "0"),
        ("NODE_ENV", "staging"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("JWT_ALGORITHM", "none"),
        ("WORKER_ID", "a.b"),
        ("WORKER_ID", "w*"),
        ("REQUEST_TIMEOUT", "nan"),
    ],
)
def test_invalid_values_raise_naming_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({var: value})
    assert var in str(info.value)


def test_attempt_timeout_may_not_exceed_total() -> None:
    with pytest.raises(SettingsError, match="REQUEST_ATTEMPT_TIMEOUT"):
        load_settings({"REQUEST_TIMEOUT": "1", "REQUEST_ATTEMPT_TIMEOUT": "2"})


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"DB_PORT": "70000", "SESSION_TTL": "0"})
    assert "DB_PORT" in str(info.value) and "SESSION_TTL" in str(info.value)


def test_production_without_jwt_secret_is_refused() -> None:
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        load_settings({"NODE_ENV": "production"})
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        load_settings({"NODE_ENV": "production", "JWT_SECRET": DEV_JWT_SECRET})


def test_production_with_a_real_secret_is_accepted() -> None:
    s = load_settings({"NODE_ENV": "production", "JWT_SECRET": GOOD_SECRET})
    assert s.env == "production" and not s.is_development


@pytest.mark.parametrize("env", ["development", "production"])
def test_short_secret_is_refused(env: str) -> None:
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        load_settings({"NODE_ENV": env, "JWT_SECRET": "s" * 31})


def test_with_overrides_validates() -> None:
    s = Settings()
    assert s.with_overrides(db_port=6380).db_port == 6380
    with pytest.raises(SettingsError, match="DB_PORT"):
        s.with_overrides(db_port=0)


def test_failure_timeout() -> None:
    s = load_settings({"HEARTBEAT_INTERVAL": "0.5", "HEARTBEAT_MISSES": "4"})
    assert s.failure_timeout == pytest.approx(2.0)
