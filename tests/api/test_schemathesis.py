"""Schemathesis over /openapi.json: requests generated from the schema, valid and invalid, sent
to a real `clipsearch serve`; no answer is a server error or strays from the schema.

The run is bounded (EXAMPLES per operation and generation mode, with a fixed seed). For a longer
one, set CLIPSEARCH_SCHEMATHESIS_EXAMPLES (and CLIPSEARCH_SCHEMATHESIS_SEED for new inputs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serving import ServeProcess

EXAMPLES = int(os.environ.get("CLIPSEARCH_SCHEMATHESIS_EXAMPLES", "8"))
SEED = os.environ.get("CLIPSEARCH_SCHEMATHESIS_SEED")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@dataclass
class Tally:
    cases: int = 0
    failures: dict[str, str] = field(default_factory=dict)


def _exercise(operation: schemathesis.APIOperation, mode: GenerationMode, tally: Tally) -> None:
    before = tally.cases

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=SEED is None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        tally.cases += 1
        try:
            case.call_and_validate(checks=CHECKS, timeout=60)
        except (Exception, BaseExceptionGroup) as exc:  # each failure kept, with its request
            key = f"{operation.label} [{mode.value}] {type(exc).__name__}"
            tally.failures.setdefault(key, f"{exc}\n{case.as_curl_command()}"[:3000])

    if SEED is not None:
        run = seed(int(SEED))(run)
    try:
        run()
    except Unsatisfiable:
        # No invalid request exists for an operation without parameters (GET /health).
        assert mode is GenerationMode.NEGATIVE and tally.cases == before, operation.label


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_or_schema_violation(
    live_server: ServeProcess,
) -> None:
    schema = schemathesis.openapi.from_url(f"{live_server.base_url}/openapi.json")
    tally = Tally()
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    assert len(operations) >= 15
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _exercise(operation, mode, tally)
    print(f"\nschemathesis: {tally.cases} cases, {len(tally.failures)} failures")
    assert not tally.failures, "\n\n".join(f"{k}:\n{v}" for k, v in tally.failures.items())
    assert "Traceback" not in live_server.log(), live_server.log()[-3000:]
