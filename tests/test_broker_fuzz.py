"""Fuzzing the broker's HTTP API from its own OpenAPI document (schemathesis): never a 5xx, never a crash,
every answer as documented. Each generated request is sent twice: as generated, and with a real
Pod-bound caller token so that the authenticated paths are fuzzed too."""
from __future__ import annotations

import uuid

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from keyless.model.names import target_name

from .broker_fixtures import (CRD_DIR, apply_broker_target, bound_caller_token, caller_pod, ensure_namespace,
                              service_account_username, start_broker)
from .helpers import install_crds

pytestmark = pytest.mark.cluster

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_broker(control_plane, control_api, run_dir):
    install_crds(control_plane, CRD_DIR / "brokertargets.keyless.dev.yaml")
    suffix = uuid.uuid4().hex[:6]
    broker_ns, callers_ns = f"kfuzz-{suffix}", f"kfuzzcallers-{suffix}"
    for ns in (broker_ns, callers_ns):
        ensure_namespace(control_api, ns)
    apply_broker_target(control_api, broker_ns, target_name("tenants", "fuzzed"), audience="keyless:tenants:fuzzed",
                        username="keyless:fuzzed:argocd",
                        allowed_callers=[service_account_username(callers_ns, "controller")], ttl=60)
    broker = start_broker(control_plane, broker_ns, run_dir / f"fuzz-{suffix}",
                          "--rate-limit-per-second", "100000", "--rate-limit-burst", "100000",
                          "--review-rate-limit-per-second", "100000", "--review-rate-limit-burst", "100000")
    token = bound_caller_token(control_api, caller_pod(control_api, callers_ns, "controller"))
    yield broker, token
    assert broker.running(), "the broker must survive the fuzzing"
    broker.stop()


@pytest.fixture(scope="module")
def broker_schema(fuzz_broker):
    broker, _ = fuzz_broker
    document = broker.get_internal("/openapi.json").json()  # the metrics listener: not on the public one
    return schemathesis.openapi.from_dict(document)


def _fuzz(operation, mode, broker, token, examples: int) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def run(case):
        generated = case.call(base_url=broker.url, verify=str(broker.ca_file), timeout=30)
        case.validate_response(generated, checks=CHECKS)
        authenticated = case.call(base_url=broker.url, verify=str(broker.ca_file), timeout=30,
                                  headers={"Authorization": f"Bearer {token}"})
        case.validate_response(authenticated, checks=CHECKS)
    run()


# (schemathesis' own pytest plugin does not load under this pytest; hypothesis is driven directly.)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_never_answers_5xx_and_answers_as_documented(fuzz_broker, broker_schema, mode):
    broker, token = fuzz_broker
    operations = [result.ok() for result in broker_schema.get_all_operations()]
    assert len(operations) >= 7
    fuzzed = 0
    for operation in operations:
        try:
            _fuzz(operation, mode, broker, token, examples=15)
            fuzzed += 1
        except Unsatisfiable:
            # nothing to make invalid (no parameters, no body): only possible in negative mode
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert fuzzed >= (len(operations) if mode is GenerationMode.POSITIVE else 2)
