"""The pure ExecCredential rules shared by the agent and `keyless token`, and the credential files."""
from __future__ import annotations

import json
import os
import stat
import threading
from datetime import datetime, timedelta, timezone

import pytest

from keyless.agent import files
from keyless.agent.exec_credential import (API_VERSION_V1, API_VERSION_V1BETA1, UnsupportedApiVersion,
                                           api_version_from_exec_info, build_exec_credential,
                                           credential_expiration, real_expiry, refresh_delay_seconds,
                                           stated_expiry)
from keyless.backoff import backoff_delay_seconds

NOW = datetime(2026, 11, 30, 1, 0, 0, 400000, tzinfo=timezone.utc)


@pytest.mark.parametrize("api_version", [API_VERSION_V1, API_VERSION_V1BETA1])
def test_exec_credential_echoes_the_configured_api_version_with_token_and_expiry(api_version):
    credential = build_exec_credential("tok", NOW, api_version)
    assert credential == {
        "apiVersion": api_version, "kind": "ExecCredential", "spec": {},
        "status": {"token": "tok", "expirationTimestamp": "2026-11-30T01:00:00Z"},
    }


def test_exec_credential_refuses_an_api_version_client_go_would_reject():
    with pytest.raises(UnsupportedApiVersion):
        build_exec_credential("tok", NOW, "client.authentication.k8s.io/v1alpha1")


def test_exec_credential_refuses_an_empty_token():
    with pytest.raises(ValueError):
        build_exec_credential("", NOW)


def test_api_version_comes_from_kubernetes_exec_info():
    info = json.dumps({"apiVersion": API_VERSION_V1BETA1, "kind": "ExecCredential", "spec": {"interactive": False}})
    assert api_version_from_exec_info(info) == API_VERSION_V1BETA1
    assert api_version_from_exec_info(None) == API_VERSION_V1
    for bad in ('{"apiVersion": "client.authentication.k8s.io/v1alpha1"}', "not json", "{}"):
        with pytest.raises(UnsupportedApiVersion):
            api_version_from_exec_info(bad)


def test_stated_expiry_lies_a_safety_margin_before_the_real_one_in_whole_seconds():
    # 60 s tokens: 10 s margin (the cap); 30 s tokens: a fifth, 6 s.
    assert stated_expiry(NOW + timedelta(seconds=60), 60) == datetime(2026, 11, 30, 1, 0, 50, tzinfo=timezone.utc)
    assert stated_expiry(NOW + timedelta(seconds=30), 30) == datetime(2026, 11, 30, 1, 0, 24, tzinfo=timezone.utc)
    assert stated_expiry(NOW + timedelta(seconds=3600), 3600) == (NOW + timedelta(seconds=3590)).replace(microsecond=0)


def test_real_expiry_takes_the_earlier_of_our_clock_and_the_brokers():
    broker_ahead = NOW + timedelta(seconds=90)
    assert real_expiry(NOW, 60, broker_ahead) == NOW + timedelta(seconds=60)
    broker_behind = NOW + timedelta(seconds=45)
    assert real_expiry(NOW, 60, broker_behind) == broker_behind
    assert real_expiry(NOW, 60, None) == NOW + timedelta(seconds=60)


def test_refresh_comes_at_about_half_the_lifetime_and_always_before_the_stated_expiry():
    for jitter in (-1.0, -0.3, 0.0, 0.7, 1.0, 5.0):
        for lifetime in (30, 60, 3600):
            delay = refresh_delay_seconds(lifetime, jitter)
            assert 0.4 * lifetime <= delay <= 0.6 * lifetime
            assert delay < (stated_expiry(NOW + timedelta(seconds=lifetime), lifetime) - NOW).total_seconds()
    assert refresh_delay_seconds(60, -1) != refresh_delay_seconds(60, 1)


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap():
    low = [backoff_delay_seconds(n, 0.0, base=0.5, cap=5) for n in range(1, 8)]
    high = [backoff_delay_seconds(n, 1.0, base=0.5, cap=5) for n in range(1, 8)]
    assert high == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert low == [h / 2 for h in high]
    assert backoff_delay_seconds(1000, 1.0, cap=5) == 5.0


def test_credential_file_is_written_atomically_with_mode_0600(tmp_path):
    credential = build_exec_credential("tok-1", NOW)
    path = files.write_credential(tmp_path, "ns.cluster", credential)
    assert path == tmp_path / "ns.cluster.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert json.loads(path.read_text()) == credential
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ns.cluster.json"]  # no temp file left


def test_readers_never_see_a_partial_credential_file_while_it_is_rewritten(tmp_path):
    big = "x" * 200_000  # large enough that a non-atomic write would be observed half done
    files.write_credential(tmp_path, "ns.c", build_exec_credential(big + "0", NOW))
    stop = threading.Event()
    torn: list[str] = []

    def read_continuously():
        while not stop.is_set():
            text = (tmp_path / "ns.c.json").read_text()
            try:
                json.loads(text)
            except ValueError:
                torn.append(text[-20:])

    reader = threading.Thread(target=read_continuously)
    reader.start()
    for i in range(200):
        files.write_credential(tmp_path, "ns.c", build_exec_credential(big + str(i), NOW))
    stop.set()
    reader.join()
    assert torn == []


def test_unsafe_target_names_never_become_file_names(tmp_path):
    for name in ("../etc/passwd", "a/b", ".hidden", "", "UPPER", "a..b"):
        assert not files.is_safe_target_name(name)
        with pytest.raises(ValueError):
            files.write_credential(tmp_path, name, build_exec_credential("t", NOW))
    assert files.is_safe_target_name("keyless-system.tenant-a-dev")


def test_existing_files_are_found_with_their_expiry_and_leftover_temp_files_removed(tmp_path):
    files.write_credential(tmp_path, "ns.a", build_exec_credential("t", NOW, API_VERSION_V1BETA1))
    (tmp_path / "ns.b.json").write_text("garbage")
    (tmp_path / ".ns.a.123.tmp").write_text("half")
    found = files.existing_credentials(tmp_path)
    assert found == {"ns.a": (NOW.replace(microsecond=0), API_VERSION_V1BETA1), "ns.b": None}
    assert not (tmp_path / ".ns.a.123.tmp").exists()
    assert credential_expiration(json.loads((tmp_path / "ns.a.json").read_text())) == NOW.replace(microsecond=0)
    assert files.remove_credential(tmp_path, "ns.a") and not files.remove_credential(tmp_path, "ns.a")
