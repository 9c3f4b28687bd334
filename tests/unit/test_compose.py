"""docker-compose.yml and the Dockerfile agree with the code: known settings, valid values,
the gateway port, the shard count in nats.conf, and service modules that exist.

Nothing here runs Docker; the files are parsed and checked against ``Settings``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from sessionmgr.common.settings import ENV_VARS, Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
NATS_CONF = REPO / "nats.conf"

OUR_SERVICES = ("supervisor", "worker", "gateway")
MODULE_FOR = {"supervisor": "sessionmgr.supervisor", "worker": "sessionmgr.worker", "gateway": "sessionmgr.gateway"}
EXTRA_ALLOWED = {"SUPERVISOR_ID"}
EXTRA_ALLOWED_PREFIXES = ("OTEL_",)
TEST_SECRET = "compose-test-secret-0123456789abcdef0123"
NATS_ROLES = ("gateway", "worker", "supervisor", "cli", "dev")

_VAR_RE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class MissingRequired(LookupError):
    pass


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose-style interpolation: ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?e}``, ``$$``."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        present = name in environ
        current = environ.get(name, "")
        if op in (":-", ":?"):
            missing = not current
        else:
            missing = not present
        if op in (":-", "-"):
            return arg if missing else current
        if op in (":?", "?"):
            if missing:
                raise MissingRequired(f"{name}: {arg}")
            return current
        return current

    return _VAR_RE.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    assert COMPOSE.exists(), "docker-compose.yml is missing"
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "KEY=value" list form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _service_settings(service: dict[str, Any], host_env: Mapping[str, str]) -> Settings:
    env = {k: interpolate(v, host_env) for k, v in _environment(service).items()}
    return load_settings(env)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _host_env_for(compose: dict[str, Any]) -> dict[str, str]:
    """An empty host environment, plus a JWT secret if the file insists on one."""
    try:
        for name in OUR_SERVICES:
            for value in _environment(compose["services"][name]).values():
                interpolate(value, {})
    except MissingRequired:
        return {"JWT_SECRET": TEST_SECRET, **{f"NATS_{role.upper()}_PASSWORD": f"compose-{role}-password" for role in NATS_ROLES}}
    return {}


def test_services_exist(compose: dict[str, Any]) -> None:
    assert {"nats", "redis", *OUR_SERVICES} <= set(compose["services"])


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_our_services_build_from_the_dockerfile_and_run_their_module(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    build = service.get("build")
    assert build is not None, f"{name} must build from the Dockerfile"
    if isinstance(build, dict):
        assert build.get("context", ".") in (".", "./")
        assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    else:
        assert build in (".", "./")
    command = _command(service)
    if name == "gateway" and not command:
        return  # the image's default CMD runs the gateway (checked below)
    assert command == ["python", "-m", MODULE_FOR[name]], command


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_every_environment_variable_is_a_known_setting(compose: dict[str, Any], name: str) -> None:
    env = _environment(compose["services"][name])
    unknown = sorted(
        var for var in env if var not in ENV_VARS and var not in EXTRA_ALLOWED and not var.startswith(EXTRA_ALLOWED_PREFIXES)
    )
    assert not unknown, f"{name} gets environment variables no service reads: {unknown}"


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_core_connection_settings(compose: dict[str, Any], name: str) -> None:
    env = _environment(compose["services"][name])
    for var in ("NATS_URL", "DB_HOST", "DB_PORT", "NODE_ENV", "JWT_SECRET", "SESSION_TTL", "SHARD_COUNT"):
        assert var in env, f"{name} lacks {var}"
    settings = _service_settings(compose["services"][name], _host_env_for(compose))
    assert settings.nats_url == "nats://nats:4222"
    assert settings.db_host == "redis"
    assert settings.db_port == 6379


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_environment_values_load_as_valid_settings(compose: dict[str, Any], name: str) -> None:
    host_env = _host_env_for(compose)
    settings = _service_settings(compose["services"][name], host_env)
    if not settings.is_development:
        # Outside development a real secret is mandatory, so compose must not supply the dev one.
        assert settings.jwt_secret == host_env.get("JWT_SECRET")
    defaults = Settings()
    assert settings.session_ttl == defaults.session_ttl


def test_the_jwt_secret_is_required_or_development_only(compose: dict[str, Any]) -> None:
    """Without JWT_SECRET on the host, compose either refuses to start or runs in development."""
    for name in OUR_SERVICES:
        service = compose["services"][name]
        try:
            settings = _service_settings(service, {})
        except MissingRequired:
            continue
        except SettingsError as exc:
            pytest.fail(f"{name}: without JWT_SECRET compose starts a container that refuses to run: {exc}")
        assert settings.is_development, f"{name} would run in production with the built-in development JWT secret"


def test_host_overrides_are_honoured(compose: dict[str, Any]) -> None:
    host_env = {**_host_env_for(compose), "JWT_SECRET": TEST_SECRET, "SESSION_TTL": "120", "NODE_ENV": "production"}
    settings = _service_settings(compose["services"]["worker"], host_env)
    assert settings.session_ttl == 120
    assert settings.jwt_secret == TEST_SECRET


def test_gateway_publishes_the_default_port(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    settings = _service_settings(gateway, _host_env_for(compose))
    assert Settings().port == 3000
    published: list[tuple[str, str]] = []
    for entry in gateway.get("ports") or []:
        if isinstance(entry, dict):
            published.append((str(entry.get("published")), str(entry["target"])))
        else:
            parts = interpolate(str(entry), {}).split("/")[0].split(":")
            published.append((parts[-2], parts[-1]))
    assert (str(Settings().port), str(settings.port)) in published, published


def test_nats_loads_nats_conf_with_jetstream(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    image = str(nats["image"])
    match = re.fullmatch(r"nats:(\d+)\.(\d+)(?:\.\d+)?(?:-[a-z0-9.]+)?", image)
    assert match, f"pin a nats 2.10+ image, got {image!r}"
    assert (int(match.group(1)), int(match.group(2))) >= (2, 10)
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in nats.get("volumes") or []}
    assert mounts.get("./nats.conf") == "/etc/nats/nats.conf"
    assert "/data" in mounts.values(), "JetStream needs a volume on /data"
    command = _command(nats)
    joined = " ".join(command)
    assert "-c /etc/nats/nats.conf" in joined
    assert "-js" in command
    assert "-sd /data" in joined
    assert nats.get("healthcheck"), "nats needs a healthcheck for depends_on"


def test_redis_persists_with_append_only_file(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).split(":")[0] == "redis" and str(redis["image"]).split(":")[1].startswith("7")
    command = _command(redis)
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).split(":")[1] == "/data" for v in redis.get("volumes") or [])
    assert redis.get("healthcheck")


def test_depends_on_waits_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in OUR_SERVICES:
        depends = services[name].get("depends_on")
        assert isinstance(depends, dict), f"{name}: depends_on needs the long form with conditions"
        assert depends.get("nats", {}).get("condition") == "service_healthy", name
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            if spec.get("condition") == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} to be healthy but it has no healthcheck"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_replicas_default_to_worker_count(compose: dict[str, Any]) -> None:
    replicas = compose["services"]["worker"]["deploy"]["replicas"]
    assert "WORKER_COUNT" in str(replicas), "worker replicas should follow ${WORKER_COUNT:-...}"
    assert int(interpolate(str(replicas), {})) == Settings().worker_count
    assert int(interpolate(str(replicas), {"WORKER_COUNT": "7"})) == 7


def test_shard_count_matches_nats_conf_and_settings(compose: dict[str, Any]) -> None:
    partitions = re.findall(r"\{\{\s*partition\(\s*(\d+)\s*,\s*1\s*\)\s*\}\}", NATS_CONF.read_text())
    assert len(partitions) == 1, "nats.conf should map sessions.* with exactly one partition(N,1)"
    n = int(partitions[0])
    assert n == Settings().shard_count
    for name in OUR_SERVICES:
        env = _environment(compose["services"][name])
        assert int(interpolate(env["SHARD_COUNT"], {})) == n, name
        # Not overridable from the host: a different SHARD_COUNT would disagree with nats.conf.
        assert int(interpolate(env["SHARD_COUNT"], {"SHARD_COUNT": "128"})) == n, name


# ---- Dockerfile ------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _module_exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec(f"{module}.__main__") is not None


def test_dockerfile_exists_and_installs_the_project() -> None:
    assert DOCKERFILE.exists()
    instructions = _dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms), froms
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs), "the image must pip install the project"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"


def test_dockerfile_default_command_is_the_gateway() -> None:
    cmds = [rest for keyword, rest in _dockerfile_instructions() if keyword == "CMD"]
    assert cmds, "Dockerfile needs a CMD"
    cmd = cmds[-1]
    argv = json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)
    assert argv == ["python", "-m", "sessionmgr.gateway"]


def test_every_referenced_module_exists(compose: dict[str, Any]) -> None:
    text = DOCKERFILE.read_text() + "\n" + COMPOSE.read_text()
    modules = set(re.findall(r"python3?\S*\s+-m\s+(sessionmgr(?:\.\w+)+)", text))
    modules |= set(re.findall(r'"python3?",\s*"-m",\s*"(sessionmgr(?:\.\w+)+)"', text))
    assert {"sessionmgr.gateway", "sessionmgr.worker", "sessionmgr.supervisor"} <= modules
    missing = sorted(m for m in modules if not _module_exists(m))
    assert not missing, f"no such runnable module: {missing}"


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("${A:-x}", {}, "x"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:-x}", {"A": "y"}, "y"),
        ("$A-${B}", {"A": "1", "B": "2"}, "1-2"),
        ("$${A}", {"A": "1"}, "${A}"),
        ("${A:?boom}", {"A": "ok"}, "ok"),
    ],
)
def test_interpolation_helper(template: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(template, env) == expected


def test_interpolation_helper_required() -> None:
    with pytest.raises(MissingRequired):
        interpolate("${A:?set A}", {})


# ---- observability: Jaeger, Prometheus, metrics ports -----------------------------------------

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"


def _published(service: dict[str, Any]) -> set[str]:
    return {interpolate(str(entry), {}).split("/")[0].split(":")[-2] for entry in service.get("ports") or [] if ":" in str(entry)}


def test_jaeger_receives_otlp_and_publishes_its_ui(compose: dict[str, Any]) -> None:
    jaeger = compose["services"]["jaeger"]
    assert str(jaeger["image"]).split(":")[0] == "jaegertracing/all-in-one"
    assert str(jaeger.get("environment", {}).get("COLLECTOR_OTLP_ENABLED", "true")).lower() == "true"
    assert "16686" in _published(jaeger)


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_our_services_export_traces_to_jaeger(compose: dict[str, Any], name: str) -> None:
    endpoint = _environment(compose["services"][name])["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert interpolate(endpoint, {}) == "http://jaeger:4318"  # OTLP/HTTP, what tracing.py exports
    assert interpolate(endpoint, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"}) == "http://otel:4318"


def test_prometheus_loads_our_config_and_rules(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert str(prometheus["image"]).split(":")[0] == "prom/prometheus"
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in prometheus.get("volumes") or [] if str(v).startswith("./")}
    assert mounts.get("./deploy/prometheus/prometheus.yml") == "/etc/prometheus/prometheus.yml"
    assert mounts.get("./deploy/prometheus/alerts.yml") == "/etc/prometheus/alerts.yml"  # beside it: rule_files are relative
    for source in mounts:
        assert (REPO / source).exists(), source
    assert "--config.file=/etc/prometheus/prometheus.yml" in _command(prometheus)
    assert "9090" in _published(prometheus)


def test_prometheus_scrapes_the_ports_our_services_listen_on(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    host_env = _host_env_for(compose)
    for name, job in (("supervisor", "sm-supervisor"), ("worker", "sm-worker")):
        settings = _service_settings(compose["services"][name], host_env)
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [name] and sd["type"] == "A"
        assert settings.metrics_port == sd["port"] != 0, name
    gateway = _service_settings(compose["services"]["gateway"], host_env)
    assert jobs["sm-gateway"]["static_configs"][0]["targets"] == [f"gateway:{gateway.port}"]


# ---- NATS users (nats.conf) ------------------------------------------------------------------


@pytest.mark.parametrize("name", OUR_SERVICES)
def test_each_service_connects_as_its_own_nats_user(compose: dict[str, Any], name: str) -> None:
    host_env = _host_env_for(compose)
    settings = _service_settings(compose["services"][name], host_env)
    assert settings.nats_user == name
    assert settings.nats_password == host_env[f"NATS_{name.upper()}_PASSWORD"]


def test_nats_gets_every_users_password_and_requires_them(compose: dict[str, Any]) -> None:
    env = _environment(compose["services"]["nats"])
    conf = NATS_CONF.read_text()
    for role in NATS_ROLES:
        var = f"NATS_{role.upper()}_PASSWORD"
        assert f"${var}" in conf, f"nats.conf does not read {var}"
        with pytest.raises(MissingRequired):
            interpolate(env[var], {})
