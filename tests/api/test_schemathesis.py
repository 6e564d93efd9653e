"""Property-based requests generated from our own OpenAPI schema (schemathesis): no operation answers with a
server error, whatever the parameters. Bounded to a few examples per operation to keep the suite fast."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.api.conftest import READ_TOKEN, Deployment

pytestmark = pytest.mark.xdist_group("api")

EXAMPLES_PER_OPERATION = 6


def test_no_server_errors(deployment: Deployment) -> None:
    schema = schemathesis.openapi.from_url(f"{deployment.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25  # FHIR read/vread/search per type, worklist, studies, chat, rerun, ops
    calls: list[int] = []

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {READ_TOKEN}"}, timeout=30)
            if case.operation.path == "/readyz" and response.status_code == 503:
                assert response.json()["inference_workers"].startswith("no inference worker")  # none runs here
                return
            calls.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error])

        no_server_error()
    assert len(calls) >= 2 * len(operations) and all(code < 500 for code in calls)
