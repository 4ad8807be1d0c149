"""`keyless broker --workers N`: several processes on one port (SO_REUSEPORT) that act as one broker: one
key writer, the pod's rate limits (not N times them), metrics that add up whichever worker answers, and a
worker that dies is replaced. The merge of metrics and the audit log's whole-line writes are unit-tested."""
from __future__ import annotations

import io
import os
import re
import signal
import uuid
from pathlib import Path

import pytest
import requests
from kubernetes import client as k

from keyless.broker.audit import PIPE_BUF, AuditLog, whole_line_chunks
from keyless.broker.workers import WorkerRole, merge_expositions
from keyless.model.names import target_name

from .broker_fixtures import (CRD_DIR, apply_broker_target, bound_caller_token, caller_pod, ensure_namespace,
                              service_account_username, start_broker)
from .helpers import eventually, install_crds


# ---- pure parts ---------------------------------------------------------------------------------------
WORKER_0 = """# HELP keyless_broker_tokens_minted_total Tokens issued, by target.
# TYPE keyless_broker_tokens_minted_total counter
keyless_broker_tokens_minted_total{target="a"} 3.0
keyless_broker_tokens_minted_total{target="b"} 1.0
# HELP keyless_broker_tokens_minted_created Tokens issued, by target.
# TYPE keyless_broker_tokens_minted_created gauge
keyless_broker_tokens_minted_created{target="a"} 200.0
# HELP keyless_broker_request_duration_seconds Time to answer.
# TYPE keyless_broker_request_duration_seconds histogram
keyless_broker_request_duration_seconds_bucket{le="0.01"} 4.0
keyless_broker_request_duration_seconds_bucket{le="+Inf"} 4.0
keyless_broker_request_duration_seconds_count 4.0
keyless_broker_request_duration_seconds_sum 0.02
# HELP keyless_broker_key_writer 1 when this replica holds the key writer Lease.
# TYPE keyless_broker_key_writer gauge
keyless_broker_key_writer 1.0
"""
WORKER_1 = """# HELP keyless_broker_tokens_minted_total Tokens issued, by target.
# TYPE keyless_broker_tokens_minted_total counter
keyless_broker_tokens_minted_total{target="a"} 2.0
# HELP keyless_broker_tokens_minted_created Tokens issued, by target.
# TYPE keyless_broker_tokens_minted_created gauge
keyless_broker_tokens_minted_created{target="a"} 100.0
# HELP keyless_broker_request_duration_seconds Time to answer.
# TYPE keyless_broker_request_duration_seconds histogram
keyless_broker_request_duration_seconds_bucket{le="0.01"} 1.0
keyless_broker_request_duration_seconds_bucket{le="+Inf"} 2.0
keyless_broker_request_duration_seconds_count 2.0
keyless_broker_request_duration_seconds_sum 0.5
# HELP keyless_broker_key_writer 1 when this replica holds the key writer Lease.
# TYPE keyless_broker_key_writer gauge
keyless_broker_key_writer 0.0
"""


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_the_pods_metrics_sum_counters_and_histograms_and_keep_the_largest_gauge():
    merged = _samples(merge_expositions([WORKER_0, WORKER_1]).decode())
    assert merged['keyless_broker_tokens_minted_total{target="a"}'] == 5.0
    assert merged['keyless_broker_tokens_minted_total{target="b"}'] == 1.0
    assert merged['keyless_broker_tokens_minted_created{target="a"}'] == 100.0
    assert merged['keyless_broker_request_duration_seconds_bucket{le="0.01"}'] == 5.0
    assert merged['keyless_broker_request_duration_seconds_bucket{le="+Inf"}'] == 6.0
    assert merged["keyless_broker_request_duration_seconds_count"] == 6.0
    assert merged["keyless_broker_request_duration_seconds_sum"] == pytest.approx(0.52)
    assert merged["keyless_broker_key_writer"] == 1.0


def test_each_worker_enforces_its_share_of_a_limit():
    assert WorkerRole(0, 1).share(100.0) == 100.0
    assert WorkerRole(1, 4).share(100.0) == 25.0
    assert WorkerRole(0, 4).writes_keys and not WorkerRole(3, 4).writes_keys


def test_audit_lines_are_written_whole_in_writes_no_larger_than_a_pipe_guarantees_atomic():
    lines = [f'{{"n":{i},"pad":"{"x" * (i * 37 % 900)}"}}\n' for i in range(200)]
    chunks = list(whole_line_chunks(lines, PIPE_BUF))
    assert "".join(chunks) == "".join(lines)
    assert all(len(c.encode()) <= PIPE_BUF and c.endswith("\n") for c in chunks)
    writes: list[str] = []

    class Recorder(io.StringIO):
        def flush(self):
            writes.append(self.getvalue())
            self.seek(0)
            self.truncate()

    audit = AuditLog(Recorder())
    for i in range(100):
        audit.decision(outcome="granted", reason="allowed", status=200, target=f"ns.c{i}", caller="sa", pod="ns/p")
    audit.flush()
    assert len(writes) > 1 and all(0 < len(w.encode()) <= PIPE_BUF and w.endswith("\n") for w in writes)
    assert sum(w.count("\n") for w in writes) == 100


# ---- the real broker with two workers --------------------------------------------------------------
CONTROLLER = "argocd-application-controller"


def _listening_sockets(port: int) -> int:
    """Sockets in LISTEN on `port` (IPv4), from the kernel's own table."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            count += 1
    return count


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _minted_total(broker) -> float:
    text = broker.get_internal("/metrics").text
    match = re.search(r"^keyless_broker_tokens_minted_total\{[^}]*\} ([\d.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _mint(broker, target: str, token: str) -> int:
    # A new connection per request: the kernel chooses a worker per connection.
    return requests.post(f"{broker.url}/v1/targets/{target}/token", headers={"Authorization": f"Bearer {token}"},
                         verify=str(broker.ca_file), timeout=30).status_code


@pytest.fixture(scope="module")
def callers(control_plane, control_api):
    install_crds(control_plane, CRD_DIR / "brokertargets.keyless.dev.yaml")
    suffix = uuid.uuid4().hex[:6]
    broker_ns, callers_ns = f"kworkers-{suffix}", f"kwcallers-{suffix}"
    for ns in (broker_ns, callers_ns):
        ensure_namespace(control_api, ns)
    target = target_name("tenants", f"workers-{suffix}")
    apply_broker_target(control_api, broker_ns, target, audience=f"keyless:tenants:workers-{suffix}",
                        username="keyless:tenant-w:argocd",
                        allowed_callers=[service_account_username(callers_ns, CONTROLLER)], ttl=60)
    pod = caller_pod(control_api, callers_ns, CONTROLLER, "controller-0")
    return {"namespace": broker_ns, "target": target, "token": bound_caller_token(control_api, pod)}


def _two_workers(control_plane, run_dir, callers, *args: str):
    broker = start_broker(control_plane, callers["namespace"], run_dir / f"broker-workers-{uuid.uuid4().hex[:6]}",
                          "--workers", "2", *args)
    port = int(broker.url.rsplit(":", 1)[1])
    # Worker 0 answers at once; worker 1 joins the port once it has loaded the keys and targets.
    eventually(lambda: _listening_sockets(port) == 2, timeout=60, message="two workers listening on the port")
    return broker, port


@pytest.mark.cluster
def test_two_workers_serve_one_port_with_one_key_writer_and_metrics_that_add_up(control_plane, control_api,
                                                                                 run_dir, callers):
    broker, port = _two_workers(control_plane, run_dir, callers, "--rate-limit-per-second", "1000",
                                "--rate-limit-burst", "1000")
    try:
        (worker,) = _children(broker.process.pid)
        lease = k.CoordinationV1Api(control_api).read_namespaced_lease("keyless-broker-key-writer",
                                                                        callers["namespace"])
        # Worker 0 holds the key writer Lease; worker 1 only follows the Secret (it never competes).
        assert f"-{broker.process.pid}-" in lease.spec.holder_identity
        assert f"-{worker}-" not in lease.spec.holder_identity
        assert [_mint(broker, callers["target"], callers["token"]) for _ in range(40)] == [200] * 40
        seen = []

        def all_counted():
            seen.append(_minted_total(broker))
            return seen[-1] >= 40 and seen[-1]
        eventually(all_counted, timeout=30, interval=0.2, message="the pod's mint counter reaching 40")
        # Scrapes land on either worker; the pod's counter never goes down from one scrape to the next.
        seen += [_minted_total(broker) for _ in range(20)]
        assert seen == sorted(seen), seen
        assert seen[-1] == 40
    finally:
        broker.stop()
    assert _listening_sockets(port) == 0


@pytest.mark.cluster
def test_two_workers_together_allow_the_configured_burst_not_twice_it(control_plane, run_dir, callers):
    broker, _ = _two_workers(control_plane, run_dir, callers, "--rate-limit-per-second", "0.01",
                             "--rate-limit-burst", "10")
    try:
        codes = [_mint(broker, callers["target"], callers["token"]) for _ in range(60)]
        assert set(codes) <= {200, 429}
        # Each worker allows 5: at most 10 in total however the kernel spread the connections.
        assert 5 <= codes.count(200) <= 10, codes
    finally:
        broker.stop()


@pytest.mark.cluster
def test_a_worker_that_dies_is_replaced_and_the_pod_keeps_minting(control_plane, run_dir, callers):
    broker, port = _two_workers(control_plane, run_dir, callers, "--rate-limit-per-second", "1000",
                                "--rate-limit-burst", "1000")
    try:
        (first,) = _children(broker.process.pid)
        os.kill(first, signal.SIGKILL)
        replacement = eventually(lambda: [p for p in _children(broker.process.pid) if p != first],
                                 timeout=60, message="a new worker")
        eventually(lambda: _listening_sockets(port) == 2, timeout=60, message="the new worker listening")
        assert [_mint(broker, callers["target"], callers["token"]) for _ in range(20)] == [200] * 20
        assert "broker worker 1 exited with code -9; restarting it" in broker.log_text()
        assert len(replacement) == 1 and broker.running()
    finally:
        broker.stop()
