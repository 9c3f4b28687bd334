"""One typed settings tree for every service, read once from the environment.

The seed's variable names and defaults are kept (``NODE_ENV``, ``DB_HOST``, ``DB_PORT``,
``SESSION_TTL``, ``WORKER_COUNT``); every new variable follows the same upper-case style and
is listed in the README. Invalid values raise :class:`SettingsError` at start-up so a bad
deployment fails loudly instead of half-working.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

DEV_JWT_SECRET = "dev-only-insecure-secret-change-me"
Environment = Literal["development", "test", "production"]
_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A webhook event filter: *, an event type, or a prefix such as message.* (WEBHOOK_EVENTS, session webhooks).
WEBHOOK_FILTER_RE = re.compile(r"^(\*|[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,3}(\.\*)?)$")


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    env: Environment = "development"
    # Redis (the seed called it the database)
    db_host: str = "localhost"
    db_port: int = 6379
    db_password: str | None = None
    db_index: int = 0
    redis_max_connections: int = 64
    # NATS
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = None
    nats_password: str | None = None
    # Gateway
    host: str = "0.0.0.0"
    port: int = 3000
    jwt_secret: str = DEV_JWT_SECRET
    jwt_algorithm: str = "HS256"
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    max_body_bytes: int = 64 * 1024
    request_timeout: float = 5.0
    request_attempt_timeout: float = 0.5
    # Sessions and sharding
    session_ttl: int = 3600
    shard_count: int = 64
    idempotency_ttl: int = 24 * 3600
    max_metadata_keys: int = 32
    max_context_bytes: int = 32 * 1024
    # Workers
    worker_count: int = 4
    worker_id: str = ""
    worker_max_in_flight: int = 256
    worker_cache_max_sessions: int = 100_000
    heartbeat_interval: float = 0.5
    heartbeat_misses: int = 3
    drain_timeout: float = 5.0
    expiry_sweep_interval: float = 1.0
    # Observability
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    service_name: str = "session-manager"
    # Metrics (issue 6): workers and supervisors serve Prometheus /metrics on METRICS_PORT
    # (0 = off; one port per process on a shared host); the gateway serves it on PORT.
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 0
    # Security (issue 5): JWKS, rate limits, TLS, CORS. See README "Security".
    jwt_jwks_url: str | None = None
    rate_limit_per_minute: int = 6000
    create_rate_limit_per_minute: int = 1200
    max_sessions_per_user: int = 10_000
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    db_tls: bool = False
    db_tls_ca: str | None = None
    cors_allow_origins: str = ""
    # WhatsApp connections (issue 7). See README "WhatsApp sessions".
    whatsapp_default_engine: str = "simulated"
    connection_max_failures: int = 5
    connection_retry_delay: float = 1.0
    qr_rotate_interval: float = 20.0
    qr_max_rotations: int = 6
    message_history_limit: int = 200
    max_message_text: int = 4096
    sim_ack_delay: float = 0.05
    # Webhooks (issue 7): global targets for every session's events, on top of per-session ones.
    webhook_url: str = ""
    webhook_events: str = "*"
    webhook_secret: str | None = None
    webhook_max_attempts: int = 12
    webhook_retry_base_delay: float = 1.0
    webhook_retry_max_delay: float = 300.0
    webhook_timeout: float = 10.0
    webhook_max_in_flight: int = 32

    @property
    def is_development(self) -> bool:
        return self.env in ("development", "test")

    @property
    def redis_url(self) -> str:
        return f"redis://{self.db_host}:{self.db_port}/{self.db_index}"

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_allow_origins.split(",") if o.strip()]

    @property
    def webhook_urls(self) -> list[str]:
        return [u.strip() for u in self.webhook_url.split(",") if u.strip()]

    @property
    def webhook_event_filter(self) -> list[str]:
        return [e.strip() for e in self.webhook_events.split(",") if e.strip()] or ["*"]

    @property
    def failure_timeout(self) -> float:
        """How long a worker may stay silent before it is declared dead."""
        return self.heartbeat_interval * self.heartbeat_misses

    def with_overrides(self, **changes: Any) -> Settings:
        return validate_settings(msgspec.structs.replace(self, **changes))


# Environment variable -> field. Kept explicit so the README table and the code agree.
ENV_VARS: dict[str, str] = {
    "NODE_ENV": "env",
    "DB_HOST": "db_host",
    "DB_PORT": "db_port",
    "DB_PASSWORD": "db_password",
    "DB_INDEX": "db_index",
    "REDIS_MAX_CONNECTIONS": "redis_max_connections",
    "NATS_URL": "nats_url",
    "NATS_USER": "nats_user",
    "NATS_PASSWORD": "nats_password",
    "HOST": "host",
    "PORT": "port",
    "JWT_SECRET": "jwt_secret",
    "JWT_ALGORITHM": "jwt_algorithm",
    "JWT_AUDIENCE": "jwt_audience",
    "JWT_ISSUER": "jwt_issuer",
    "MAX_BODY_BYTES": "max_body_bytes",
    "REQUEST_TIMEOUT": "request_timeout",
    "REQUEST_ATTEMPT_TIMEOUT": "request_attempt_timeout",
    "SESSION_TTL": "session_ttl",
    "SHARD_COUNT": "shard_count",
    "IDEMPOTENCY_TTL": "idempotency_ttl",
    "MAX_METADATA_KEYS": "max_metadata_keys",
    "MAX_CONTEXT_BYTES": "max_context_bytes",
    "WORKER_COUNT": "worker_count",
    "WORKER_ID": "worker_id",
    "WORKER_MAX_IN_FLIGHT": "worker_max_in_flight",
    "WORKER_CACHE_MAX_SESSIONS": "worker_cache_max_sessions",
    "HEARTBEAT_INTERVAL": "heartbeat_interval",
    "HEARTBEAT_MISSES": "heartbeat_misses",
    "DRAIN_TIMEOUT": "drain_timeout",
    "EXPIRY_SWEEP_INTERVAL": "expiry_sweep_interval",
    "LOG_LEVEL": "log_level",
    "LOG_FORMAT": "log_format",
    "OTEL_SERVICE_NAME": "service_name",
    # Metrics
    "METRICS_HOST": "metrics_host",
    "METRICS_PORT": "metrics_port",
    # Security
    "JWT_JWKS_URL": "jwt_jwks_url",
    "RATE_LIMIT_PER_MINUTE": "rate_limit_per_minute",
    "CREATE_RATE_LIMIT_PER_MINUTE": "create_rate_limit_per_minute",
    "MAX_SESSIONS_PER_USER": "max_sessions_per_user",
    "TLS_CERT_FILE": "tls_cert_file",
    "TLS_KEY_FILE": "tls_key_file",
    "NATS_TLS_CA": "nats_tls_ca",
    "NATS_TLS_CERT": "nats_tls_cert",
    "NATS_TLS_KEY": "nats_tls_key",
    "DB_TLS": "db_tls",
    "DB_TLS_CA": "db_tls_ca",
    "CORS_ALLOW_ORIGINS": "cors_allow_origins",
    # WhatsApp connections
    "WHATSAPP_DEFAULT_ENGINE": "whatsapp_default_engine",
    "CONNECTION_MAX_FAILURES": "connection_max_failures",
    "CONNECTION_RETRY_DELAY": "connection_retry_delay",
    "QR_ROTATE_INTERVAL": "qr_rotate_interval",
    "QR_MAX_ROTATIONS": "qr_max_rotations",
    "MESSAGE_HISTORY_LIMIT": "message_history_limit",
    "MAX_MESSAGE_TEXT": "max_message_text",
    "SIM_ACK_DELAY": "sim_ack_delay",
    # Webhooks
    "WEBHOOK_URL": "webhook_url",
    "WEBHOOK_EVENTS": "webhook_events",
    "WEBHOOK_SECRET": "webhook_secret",
    "WEBHOOK_MAX_ATTEMPTS": "webhook_max_attempts",
    "WEBHOOK_RETRY_BASE_DELAY": "webhook_retry_base_delay",
    "WEBHOOK_RETRY_MAX_DELAY": "webhook_retry_max_delay",
    "WEBHOOK_TIMEOUT": "webhook_timeout",
    "WEBHOOK_MAX_IN_FLIGHT": "webhook_max_in_flight",
}

_ENV_ALIASES = {"APP_ENV": "NODE_ENV"}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from the environment; unknown values raise :class:`SettingsError`."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for alias, canonical in _ENV_ALIASES.items():
        if alias in environ and canonical not in environ:
            raw[ENV_VARS[canonical]] = environ[alias]
    for var, field in ENV_VARS.items():
        value = environ.get(var)
        if value is not None and value != "":
            raw[field] = value
    if raw.get("env") == "dev":
        raw["env"] = "development"
    if raw.get("env") == "prod":
        raw["env"] = "production"
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid setting: {_name_env_var(str(exc))}") from None
    return validate_settings(settings)


def _name_env_var(message: str) -> str:
    """Rewrite msgspec's ``$.field`` paths into the environment variable the operator set."""
    for var, field in ENV_VARS.items():
        message = message.replace(f"`$.{field}`", var)
    return message


def validate_settings(s: Settings) -> Settings:
    problems: list[str] = []

    def check(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    check(1 <= s.db_port <= 65535, "DB_PORT must be a TCP port (1-65535)")
    check(0 <= s.port <= 65535, "PORT must be a TCP port (0-65535)")
    check(s.nats_url.startswith(("nats://", "tls://", "ws://", "wss://")), "NATS_URL must start with nats:// or tls://")
    check(1 <= s.session_ttl <= 365 * 24 * 3600, "SESSION_TTL must be between 1 second and 1 year")
    check(1 <= s.shard_count <= 4096, "SHARD_COUNT must be between 1 and 4096")
    check(1 <= s.worker_count <= 256, "WORKER_COUNT must be between 1 and 256")
    check(1 <= s.worker_max_in_flight <= 10_000, "WORKER_MAX_IN_FLIGHT must be between 1 and 10000")
    check(2 <= s.redis_max_connections <= 1000, "REDIS_MAX_CONNECTIONS must be between 2 and 1000")
    check(s.worker_cache_max_sessions >= 1, "WORKER_CACHE_MAX_SESSIONS must be at least 1")
    check(0.05 <= s.heartbeat_interval <= 60, "HEARTBEAT_INTERVAL must be between 0.05 and 60 seconds")
    check(2 <= s.heartbeat_misses <= 100, "HEARTBEAT_MISSES must be between 2 and 100")
    check(0.1 <= s.request_timeout <= 120, "REQUEST_TIMEOUT must be between 0.1 and 120 seconds")
    check(
        0.05 <= s.request_attempt_timeout <= s.request_timeout,
        "REQUEST_ATTEMPT_TIMEOUT must be at least 0.05 s and at most REQUEST_TIMEOUT",
    )
    check(1024 <= s.max_body_bytes <= 16 * 1024 * 1024, "MAX_BODY_BYTES must be between 1 KiB and 16 MiB")
    check(60 <= s.idempotency_ttl <= 7 * 24 * 3600, "IDEMPOTENCY_TTL must be between 60 s and 7 days")
    check(1 <= s.max_metadata_keys <= 1000, "MAX_METADATA_KEYS must be between 1 and 1000")
    check(256 <= s.max_context_bytes <= 1024 * 1024, "MAX_CONTEXT_BYTES must be between 256 B and 1 MiB")
    check(0 <= s.drain_timeout <= 120, "DRAIN_TIMEOUT must be between 0 and 120 seconds")
    check(0 <= s.metrics_port <= 65535, "METRICS_PORT must be a TCP port (1-65535), or 0 for no metrics listener")
    check(0.05 <= s.expiry_sweep_interval <= 3600, "EXPIRY_SWEEP_INTERVAL must be between 0.05 and 3600 seconds")
    check(s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    _check_security(s, check)
    _check_whatsapp(s, check)
    check(not s.worker_id or bool(_WORKER_ID_RE.match(s.worker_id)), "WORKER_ID may only hold A-Z a-z 0-9 _ -")
    if not s.is_development:
        check(s.jwt_secret != DEV_JWT_SECRET, "JWT_SECRET must be set outside development (NODE_ENV=production)")
    check(len(s.jwt_secret) >= 32, "JWT_SECRET must be at least 32 characters (RFC 7518 wants 256-bit HS256 keys)")
    if problems:
        raise SettingsError("; ".join(problems))
    return s


def _check_whatsapp(s: Settings, check: Any) -> None:
    check(1 <= s.connection_max_failures <= 100, "CONNECTION_MAX_FAILURES must be between 1 and 100")
    check(0.01 <= s.connection_retry_delay <= 300, "CONNECTION_RETRY_DELAY must be between 0.01 and 300 seconds")
    check(0.05 <= s.qr_rotate_interval <= 300, "QR_ROTATE_INTERVAL must be between 0.05 and 300 seconds")
    check(1 <= s.qr_max_rotations <= 100, "QR_MAX_ROTATIONS must be between 1 and 100")
    check(1 <= s.message_history_limit <= 10_000, "MESSAGE_HISTORY_LIMIT must be between 1 and 10000")
    check(1 <= s.max_message_text <= 65_536, "MAX_MESSAGE_TEXT must be between 1 and 65536 characters")
    check(0 <= s.sim_ack_delay <= 60, "SIM_ACK_DELAY must be between 0 and 60 seconds")
    urls = s.webhook_urls
    check(len(urls) <= 16, "WEBHOOK_URL holds at most 16 comma-separated URLs")
    check(all(u.startswith(("https://", "http://")) and len(u) <= 2048 for u in urls), "WEBHOOK_URL is a comma-separated list of http(s) URLs")
    check(all(WEBHOOK_FILTER_RE.fullmatch(e) for e in s.webhook_event_filter), "WEBHOOK_EVENTS is a comma-separated list of event types, prefixes such as message.*, or *")
    check(1 <= s.webhook_max_attempts <= 50, "WEBHOOK_MAX_ATTEMPTS must be between 1 and 50")
    check(0.01 <= s.webhook_retry_base_delay <= 3600, "WEBHOOK_RETRY_BASE_DELAY must be between 0.01 and 3600 seconds")
    check(s.webhook_retry_base_delay <= s.webhook_retry_max_delay <= 24 * 3600, "WEBHOOK_RETRY_MAX_DELAY must be at least WEBHOOK_RETRY_BASE_DELAY and at most a day")
    check(0.1 <= s.webhook_timeout <= 120, "WEBHOOK_TIMEOUT must be between 0.1 and 120 seconds")
    check(1 <= s.webhook_max_in_flight <= 1000, "WEBHOOK_MAX_IN_FLIGHT must be between 1 and 1000")


SYMMETRIC_JWT_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def _check_security(s: Settings, check: Any) -> None:
    algorithms = SYMMETRIC_JWT_ALGORITHMS + ASYMMETRIC_JWT_ALGORITHMS
    check(s.jwt_algorithm in algorithms, f"JWT_ALGORITHM must be one of {', '.join(algorithms)} (never 'none')")
    if s.jwt_algorithm in ASYMMETRIC_JWT_ALGORITHMS:
        check(bool(s.jwt_jwks_url), f"JWT_ALGORITHM={s.jwt_algorithm} needs JWT_JWKS_URL (the identity provider's public keys)")
    if s.jwt_jwks_url:
        check(s.jwt_algorithm in ASYMMETRIC_JWT_ALGORITHMS, "JWT_JWKS_URL needs an asymmetric JWT_ALGORITHM such as RS256 or ES256")
        check(s.jwt_jwks_url.startswith(("https://", "http://")), "JWT_JWKS_URL must be an http(s) URL")
        if not s.is_development:
            check(s.jwt_jwks_url.startswith("https://"), "JWT_JWKS_URL must use https outside development")
    check(0 <= s.rate_limit_per_minute <= 1_000_000, "RATE_LIMIT_PER_MINUTE must be between 0 (off) and 1000000")
    check(0 <= s.create_rate_limit_per_minute <= 1_000_000, "CREATE_RATE_LIMIT_PER_MINUTE must be between 0 (off) and 1000000")
    check(0 <= s.max_sessions_per_user <= 10_000_000, "MAX_SESSIONS_PER_USER must be between 0 (off) and 10000000")
    check(bool(s.tls_cert_file) == bool(s.tls_key_file), "TLS_CERT_FILE and TLS_KEY_FILE go together")
    check(bool(s.nats_tls_cert) == bool(s.nats_tls_key), "NATS_TLS_CERT and NATS_TLS_KEY go together")
    for var, path in (
        ("TLS_CERT_FILE", s.tls_cert_file),
        ("TLS_KEY_FILE", s.tls_key_file),
        ("NATS_TLS_CA", s.nats_tls_ca),
        ("NATS_TLS_CERT", s.nats_tls_cert),
        ("NATS_TLS_KEY", s.nats_tls_key),
        ("DB_TLS_CA", s.db_tls_ca),
    ):
        check(not path or os.path.isfile(path), f"{var} names a file that does not exist: {path}")
    origins = s.cors_origins
    check(all(o == "*" or o.startswith(("https://", "http://")) for o in origins), "CORS_ALLOW_ORIGINS is a comma-separated list of http(s) origins, or *")


def default_worker_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}"
