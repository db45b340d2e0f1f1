"""Property test: schemathesis generates requests from the API's own OpenAPI spec, with and
without a valid key; none may end in a server error.

(schemathesis's pytest plugin does not run on pytest 9, so each operation's strategy is driven by
Hypothesis directly.)"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.api.conftest import LiveAPI


def test_no_request_gets_a_server_error(live_api: LiveAPI) -> None:
    key = live_api.new_key("fuzzer")
    schema = schemathesis.openapi.from_url(f"{live_api.root}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: schemathesis.Case) -> None:
            for headers in ({"Authorization": f"Bearer {key}"}, {}):
                case.call_and_validate(
                    base_url=live_api.root, headers=headers, checks=[schemathesis.checks.not_a_server_error]
                )

        no_server_error()
