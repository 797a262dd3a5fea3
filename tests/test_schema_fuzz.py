"""schemathesis against the service's own OpenAPI schema, every operation: no internal
error (500-502) and every answer as the schema documents it (status, content type, body).
503 and 504 are documented answers (no worker, deadline) and allowed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import Service, embedded_service  # noqa: E402


@pytest.fixture(scope="module")
def fuzzed(every_task_repo: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Service]:
    env = {"CVSERVE_MODEL_REPOSITORY": str(every_task_repo),
           "CVSERVE_AUTO_BUILD_DEFAULT": "false", "CVSERVE_REQUEST_TIMEOUT_S": "20"}
    with embedded_service(env, tmp_path_factory.mktemp("fuzz-logs")) as svc:
        yield svc


@pytest.fixture(scope="module")
def api_schema(fuzzed: Service):
    return schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schemathesis.check
def no_internal_error(ctx, response, case) -> None:
    if response.status_code >= 500 and response.status_code not in (503, 504):
        raise AssertionError(f"{case.method} {case.path}: {response.status_code} "
                             f"{response.text[:300]}")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case) -> None:
    case.call_and_validate(checks=[no_internal_error, response_schema_conformance,
                                   status_code_conformance, content_type_conformance])
