"""Schema-driven fuzzing of a real gateway process with schemathesis: valid and invalid input, with a
valid and with a forged token. No 5xx, and every response (status, content type, body) matches
the OpenAPI schema the gateway publishes. Bounded in examples so it stays well under a minute.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from sessionmgr.common import procs
from tests.conftest import token_for
from tests.support.cluster import Cluster, env_for
from tests.support.security import forge_hs256

pytestmark = pytest.mark.slow

EXAMPLES_PER_MODE = 60
TIME_BUDGET_S = 45.0
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def gateway_url(cluster: Cluster) -> Iterator[str]:
    port = procs.free_port()
    env = {**env_for(cluster.settings), "HOST": "127.0.0.1", "PORT": str(port), "LOG_FORMAT": "json"}
    proc = procs.service("gateway", "gateway-fuzz", env, log_path=cluster.servers.root / "logs" / "gateway-fuzz.log").start()
    try:
        proc.wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_5xx_and_match_the_schema(gateway_url: str, mode: schemathesis.GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway_url}/schema/openapi.json")
    valid = {"Authorization": f"Bearer {token_for('fuzz-user')}"}
    forged = {"Authorization": "Bearer " + forge_hs256({"sub": "fuzz-user", "exp": int(time.time()) + 600}, b"not-the-secret")}
    deadline = time.monotonic() + TIME_BUDGET_S
    seen: set[int] = set()

    @hypothesis.given(case=schema.as_strategy(mode))
    @hypothesis.settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        if time.monotonic() > deadline:
            return
        for headers in (valid, forged):
            response = case.call(base_url=gateway_url, headers=headers, timeout=10)
            seen.add(response.status_code)
            case.validate_response(response, checks=CHECKS, headers=headers)

    run()
    assert seen, "no request was sent"
    assert 401 in seen  # the forged token was refused
