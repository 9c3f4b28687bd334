"""Who a process is on NATS: its user, password, TLS and private inbox prefix.

``nats.conf`` defines one NATS user per role (gateway, worker, supervisor, cli, dev) whose
passwords come from the nats-server's environment (``NATS_<ROLE>_PASSWORD``). ``make run`` and the
tests start nats-server with the development passwords below unless those variables are set;
docker compose requires real ones. A service says who it is with ``NATS_USER``/``NATS_PASSWORD``.

Each user gets its own inbox prefix (``_INBOX_<user>``), and nats.conf lets a user subscribe only
to its own, so no client can read the replies meant for another role (the gateway's replies hold
every user's sessions).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from sessionmgr.common.settings import Settings
from sessionmgr.common.tls import nats_tls_context

ROLES = ("gateway", "worker", "supervisor", "cli", "dev")
_USER_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def password_var(role: str) -> str:
    """The nats-server environment variable nats.conf reads for ``role``'s password."""
    return f"NATS_{role.upper()}_PASSWORD"


def dev_password(role: str) -> str:
    """Development only: known to everyone, so ``make run`` binds NATS to 127.0.0.1."""
    return f"dev-{role}-password-not-secret"


def server_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every role's password for nats-server: the environment's, else the development default."""
    environ = os.environ if environ is None else environ
    return {password_var(role): environ.get(password_var(role)) or dev_password(role) for role in ROLES}


def role_env(role: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``NATS_USER``/``NATS_PASSWORD`` for a service process started as ``role``."""
    return {"NATS_USER": role, "NATS_PASSWORD": server_env(environ)[password_var(role)]}


def inbox_prefix(user: str | None) -> str:
    if user and _USER_RE.fullmatch(user):
        return f"_INBOX_{user}"
    return "_INBOX"


def connect_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` shared by every service: credentials, inbox, TLS."""
    options: dict[str, Any] = {
        "user": settings.nats_user,
        "password": settings.nats_password,
        "inbox_prefix": inbox_prefix(settings.nats_user),
    }
    tls = nats_tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    return options


def role_credentials(role: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``nats.connect(**role_credentials("dev"))`` for tools and tests (development passwords by default)."""
    return {"user": role, "password": server_env(environ)[password_var(role)]}
