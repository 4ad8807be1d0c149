"""The chart's alert rules (charts/keyless/files/prometheus/keyless-rules.yaml) against the real thing:
`promtool check rules` accepts them, and each alert fires when the thing it watches is broken for real.

One world: the control plane, a Direct-mode tenant API server, the real broker, the real operator (also
serving the guardrail webhooks) and the real agent with a Pod-bound token of the application controller.
A scraper reads their /metrics every two seconds, labelled as the Prometheus Operator labels targets.
Each scenario breaks one thing (stops the tenant, stops the broker, revokes a caller that keeps asking, runs
a broker that may not list its targets nor rotate its keys, has a tenant retry a refused Application), and
`promtool test rules` evaluates the real rules over the scraped window, the broken state held for longer than
each alert's `for:` (see alert_checks). A healthy window fires none of them.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import json
import re
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid

import pytest
import yaml

from keyless import pki
from keyless.broker.keys import KEY_SECRET_NAME
from keyless.envtest.cluster import free_port, start_process, stop_process, tail
from keyless.webhooks import configuration, policy

from .alert_checks import Scraper, Target, promtool_test, rules
from .broker_fixtures import bound_caller_token, caller_pod, ensure_namespace, start_broker
from .chain_fixtures import running_chain
from .conftest import ROOT, require_binary
from .helpers import eventually, kubectl
from .operator_fixtures import KEYLESS, apply, tenant_namespace

pytestmark = [pytest.mark.cluster, require_binary("promtool")]

RULES = ROOT / "charts" / "keyless" / "files" / "prometheus" / "keyless-rules.yaml"
NAMESPACE = "tenants-alerts"
TENANT = "tenant-alerts"
OTHER_NAMESPACE = "tenants-alerts-other"
OTHER_TENANT = "tenant-alerts-other"
NAME = "alerts"
TARGET = f"{NAMESPACE}.{NAME}"
CONTROLLER = "system:serviceaccount:argocd:argocd-application-controller"
LEGACY_CALLER = "system:serviceaccount:argocd:legacy-caller"
CRIPPLED_NAMESPACE = "keyless-crippled"
INTERVAL = 2.0
HOLD_SECONDS = 45 * 60  # longer than every alert's `for:` plus its rate() window
AGENT_POD = {"namespace": "argocd", "pod": "argocd-application-controller-0"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    from keyless.envtest import binaries

    return subprocess.run([str(binaries.find("promtool")), *args], capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules_and_every_alert_says_what_to_do():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = rules(RULES)
    assert f"SUCCESS: {len(alerts)} rules found" in result.stdout
    assert len(alerts) == 8
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, name


def test_promtool_refuses_a_broken_rule(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(RULES.read_text().replace("> 0.05", "> > 0.05", 1))
    result = promtool("check", "rules", str(broken))
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def manifest(chain, callers: list[str]) -> dict:
    return {"apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
            "metadata": {"name": NAME, "namespace": NAMESPACE},
            "spec": {"tenant": TENANT, "server": chain.tenant.server,
                     "caData": base64.b64encode(chain.tenant.ca_pem).decode(),
                     "access": {"clusterRole": "alerts-reader", "username": f"keyless:{TENANT}:argocd",
                                "allowedCallers": callers, "tokenTTLSeconds": 30},
                     "proxy": {"mode": "Direct"}}}


def _webhook_args(directory):
    ca, _ = pki.new_ca("alerts-webhook-ca")
    serving = pki.issue_certificate(ca, "keyless-webhooks", server=True, ip_addresses=("127.0.0.1",))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tls.crt").write_bytes(serving.cert_pem)
    (directory / "tls.key").write_bytes(serving.key_pem)
    port = free_port()
    return ca.cert_pem, port, [f"--webhook-listen=127.0.0.1:{port}",
                               f"--webhook-tls-cert-file={directory / 'tls.crt'}",
                               f"--webhook-tls-key-file={directory / 'tls.key'}",
                               "--webhook-admin-group=system:masters"]


@pytest.fixture(scope="module")
def world(control_plane, control_api, run_dir):
    workdir = run_dir / "alerts"
    webhook_ca, webhook_port, webhook_args = _webhook_args(workdir / "webhooks")
    tenant_namespace(control_plane, NAMESPACE, TENANT)
    tenant_namespace(control_plane, OTHER_NAMESPACE, OTHER_TENANT)
    with running_chain(control_plane, control_api, workdir, NAMESPACE, f"keyless:{NAMESPACE}:{NAME}",
                       "alerts-tenant", *webhook_args) as chain:
        kubectl(chain.tenant, "create", "clusterrole", "alerts-reader", "--verb=get,list", "--resource=configmaps")
        kubectl(chain.tenant, "create", "clusterrolebinding", "alerts-reader", "--clusterrole=alerts-reader",
                f"--user=keyless:{TENANT}:argocd")
        apply(control_plane, manifest(chain, [CONTROLLER, LEGACY_CALLER]))
        chain.wait(NAME, "Ready", "True", timeout=90)
        # The guardrails, registered as the chart registers them.
        client_config = functools.partial(configuration.url_client_config, f"https://127.0.0.1:{webhook_port}",
                                          webhook_ca)
        exemptions = policy.Exemptions.build(admin_groups=["system:masters"])
        kubectl(control_plane, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            configuration.render_validating_webhook_configuration(client_config, exemptions=exemptions),
            configuration.render_mutating_webhook_configuration(client_config)]}))
        # The agent beside the application controller, with its Pod-bound token.
        controller_pod = caller_pod(control_api, "argocd", "argocd-application-controller",
                                    f"argocd-application-controller-{uuid.uuid4().hex[:6]}")
        chain.controller_token = bound_caller_token(control_api, controller_pod, seconds=3600)
        token_file = workdir / "controller-token"
        token_file.write_text(chain.controller_token)
        chain.credentials = workdir / "credentials"
        chain.credentials.mkdir()
        agent_port = free_port()
        agent = start_process([str(KEYLESS), "agent", "--broker-url", chain.broker.url,
                               "--broker-ca-file", str(chain.broker.ca_file), "--token-file", str(token_file),
                               "--dir", str(chain.credentials), f"--health-listen=127.0.0.1:{agent_port}",
                               "--targets-poll-seconds", "2"], workdir / "agent.log")
        scraper = Scraper({
            "operator": Target(f"http://127.0.0.1:{chain.operator.metrics_port}/metrics",
                               {"job": "keyless-operator", "namespace": "keyless-system", "pod": "keyless-operator-0"}),
            "broker": Target(f"{chain.broker.metrics_url}/metrics",  # its metrics listener, not the public one
                             {"job": "keyless-broker", "namespace": "keyless-system", "pod": "keyless-broker-0"}),
            "agent": Target(f"http://127.0.0.1:{agent_port}/metrics", {"job": "keyless-agents", **AGENT_POD}),
        }, interval=INTERVAL).start()
        chain.scraper, chain.agent, chain.workdir = scraper, agent, workdir
        try:
            eventually(lambda: (chain.credentials / f"{TARGET}.json").exists(), timeout=60, message="agent file")
            yield chain
        finally:
            scraper.stop()
            stop_process(agent)
            chain.broker.stop()  # a broker restarted by a scenario (running_chain stops the first one)
            kubectl(control_plane, "delete", "validatingwebhookconfiguration,mutatingwebhookconfiguration",
                    configuration.DEFAULT_NAME, "--ignore-not-found", check=False)


def check(world, start: int, expect: dict, name: str) -> None:
    result = promtool_test(RULES, world.workdir / name, world.scraper.window(start), INTERVAL, expect, HOLD_SECONDS)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "SUCCESS" in result.stdout


def test_a_healthy_fleet_fires_no_alert(world):
    start = world.scraper.mark()
    # Some token traffic, as Argo CD makes it.
    for _ in range(3):
        assert world.broker.mint(TARGET, world.controller_token).status_code == 200
    world.scraper.wait_scrapes(10)
    check(world, start, {name: [] for name in rules(RULES)}, "healthy")


# Families prometheus_client adds to a process's default registry on its own (process and runtime).
RUNTIME_FAMILIES = re.compile(r"^(process|python)_[a-z_]+$")
SCHEME = re.compile(r"^keyless_(operator|broker|agent|webhooks)_[a-z][a-z0-9_]*$")
UNITS = {"second": "_seconds", "byte": "_bytes"}


def naming_problems(component: str, exposition: str) -> list[str]:
    """Every family of a real /metrics (its `# TYPE` and `# HELP` lines) against the scheme:
    keyless_<component>_*, counters end in _total, and a metric whose help speaks of seconds or bytes carries
    the unit in its name."""
    types = dict(line.split()[2:4] for line in exposition.splitlines() if line.startswith("# TYPE "))
    helps = {line.split()[2]: " ".join(line.split()[3:]) for line in exposition.splitlines()
             if line.startswith("# HELP ")}
    problems = []
    for name, kind in types.items():
        if RUNTIME_FAMILIES.match(name):
            continue
        base = name[:-len("_created")] if name.endswith("_created") else None
        if base and (base in types or base + "_total" in types):
            continue  # the creation time prometheus_client adds to a counter or histogram
        if not SCHEME.match(name):
            problems.append(f"{component}: {name} is not keyless_<operator|broker|agent|webhooks>_*")
            continue
        prefix = name.split("_")[1]
        if prefix != component and not (component == "operator" and prefix == "webhooks"):
            problems.append(f"{component}: {name} carries another component's prefix")
        if kind == "counter" and not name.endswith("_total"):
            problems.append(f"{component}: counter {name} does not end in _total")
        documentation = helps.get(name, "").lower()
        for word, suffix in UNITS.items():
            if word in documentation and kind != "counter" and not name.endswith(suffix) \
                    and not name.endswith("_ratio") and "per second" not in documentation:
                problems.append(f"{component}: {name} measures {word}s ({documentation!r}) without {suffix}")
    return problems


def test_every_metric_each_component_exposes_follows_one_naming_scheme(world):
    """keyless_operator_* (with the webhooks it serves: keyless_webhooks_*), keyless_broker_*,
    keyless_agent_*; units in names. Read from the real processes' /metrics, as Prometheus scrapes them."""
    world.scraper.wait_scrapes(1)
    problems, seen = [], {}
    for component in ("operator", "broker", "agent"):
        target = world.scraper.targets[component]
        with urllib.request.urlopen(target.url, context=target.context, timeout=10) as r:
            text = r.read().decode()
        problems += naming_problems(component, text)
        seen[component] = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE keyless_")}
    assert not problems, "\n".join(problems)
    assert {"keyless_operator_reconciles_total", "keyless_operator_cluster_ready",
            "keyless_webhooks_decisions_total"} <= seen["operator"]
    assert "keyless_broker_tokens_minted_total" in seen["broker"]
    assert any(n.startswith("keyless_agent_") for n in seen["agent"])
    # the operator's per-cluster readiness: this world's cluster is Ready
    with urllib.request.urlopen(world.scraper.targets["operator"].url, timeout=10) as r:
        assert re.search(rf'^keyless_operator_cluster_ready\{{cluster_name="{NAME}",cluster_namespace="{NAMESPACE}"\}} 1',
                         r.read().decode(), re.M)


def test_naming_scheme_check_catches_a_bad_name():
    bad = ("# HELP keyless_reconcile_total x\n# TYPE keyless_reconcile_total counter\nkeyless_reconcile_total 1\n"
           "# HELP keyless_broker_key_age Age of the key in seconds.\n# TYPE keyless_broker_key_age gauge\n"
           "keyless_broker_key_age 3\n")
    problems = naming_problems("broker", bad)
    assert any("keyless_reconcile_total" in p for p in problems)
    assert any("keyless_broker_key_age" in p and "_seconds" in p for p in problems)


def test_tenant_down_fires_not_ready_and_chain_unverified(world):
    world.tenant.stop_apiserver()
    try:
        start = world.scraper.mark()
        world.wait(NAME, "TokenVerified", "False", "TenantUnreachable", timeout=60)
        world.scraper.wait_scrapes(5)
        cluster = {"cluster_namespace": NAMESPACE, "cluster_name": NAME}
        check(world, start, {"KeylessClusterNotReady": [cluster], "KeylessClusterChainUnverified": [cluster]},
              "tenant-down")
    finally:
        world.tenant.restart_apiserver()
    world.wait(NAME, "Ready", "True", "Reconciled", timeout=90)


def test_broker_down_fires_broker_unreachable_and_credentials_expiring(world):
    start = world.scraper.mark()
    world.broker.stop()
    try:
        credential = world.credentials / f"{TARGET}.json"
        # 30 s tokens: the agent removes the file at its stated expiry once no refresh succeeded.
        eventually(lambda: not credential.exists(), timeout=60, message="the credential ran out")
        world.scraper.wait_scrapes(3)
        check(world, start, {"KeylessBrokerUnreachable": [AGENT_POD], "KeylessAgentCredentialsExpiring": [AGENT_POD]},
              "broker-down")
    finally:
        world.broker = world.broker.restarted(world.control)
    eventually(lambda: (world.credentials / f"{TARGET}.json").exists(), timeout=60, message="agent recovered")


@contextlib.contextmanager
def asking_in_a_loop(world, target: str, token_file, every: float = 0.3):
    """A token-mode caller (`keyless token`, as Argo CD's exec runs it) asking again and again."""
    stop = threading.Event()
    outcomes: list[tuple[int, str]] = []  # (exit code, stderr)

    def loop():
        while not stop.is_set():
            result = subprocess.run([str(KEYLESS), "token", "--broker-url", world.broker.url, "--target", target,
                                     "--broker-ca-file", str(world.broker.ca_file), "--token-file", str(token_file)],
                                    capture_output=True, text=True, timeout=30)
            outcomes.append((result.returncode, result.stderr))
            stop.wait(every)
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield outcomes
    finally:
        stop.set()
        thread.join(60)


def test_revoked_caller_that_keeps_asking_fires_refusals_rising(world, control_api):
    pod = caller_pod(control_api, "argocd", "legacy-caller", f"legacy-caller-{uuid.uuid4().hex[:6]}")
    token_file = world.workdir / "legacy-token"
    token_file.write_text(bound_caller_token(control_api, pod))
    with asking_in_a_loop(world, TARGET, token_file) as outcomes:
        eventually(lambda: any(code == 0 for code, _ in outcomes), timeout=30, message="served while allowed")
        apply(world.control, manifest(world, [CONTROLLER]))
        eventually(lambda: len(outcomes) > 3 and all("caller_not_allowed" in err for _, err in outcomes[-3:]),
                   timeout=60, message="the caller is refused once revoked")
        start = world.scraper.mark()
        world.scraper.wait_scrapes(10)
    assert "caller_not_allowed" in world.broker.log_text()
    check(world, start, {"KeylessBrokerRefusalsRising": [{"reason": "caller_not_allowed"}]}, "caller-revoked")


def _crippled_kubeconfig(world, control_api):
    """An identity that may read its key Secret and review tokens, but not list BrokerTargets, hold the
    key writer's Lease or write keys: a broker under RBAC broken this way."""
    account = "crippled-broker"
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "namespace": CRIPPLED_NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": account, "namespace": CRIPPLED_NAMESPACE},
         "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [KEY_SECRET_NAME],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": account, "namespace": CRIPPLED_NAMESPACE},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": CRIPPLED_NAMESPACE}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": account},
         "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                   {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": account},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": account},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": CRIPPLED_NAMESPACE}]},
    ]
    kubectl(world.control, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    token = kubectl(world.control, "create", "token", account, "-n", CRIPPLED_NAMESPACE, "--duration=1h").stdout.strip()
    path = world.workdir / "crippled.kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": world.control.server,
                                               "certificate-authority-data": base64.b64encode(world.control.ca_pem).decode()}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


def test_broker_under_broken_rbac_fires_server_errors_and_rotation_overdue(world, control_api):
    ensure_namespace(control_api, CRIPPLED_NAMESPACE)
    # The keys a healthy broker stored earlier (rotating daily)...
    seeding = start_broker(world.control, CRIPPLED_NAMESPACE, world.workdir / "seed-broker", "--key-rotation-seconds",
                           "86400")
    seeding.stop()
    # ...then a broker that should rotate every 10 s but may not, and cannot list its targets.
    kubeconfig = _crippled_kubeconfig(world, control_api)
    port, metrics_port = free_port(), free_port()
    directory = world.workdir / "crippled-broker"
    from .broker_fixtures import broker_tls

    ca, cert, key = broker_tls(directory)
    log = directory / "broker.log"
    process = start_process([str(KEYLESS), "broker", "--issuer", f"https://127.0.0.1:{port}",
                             "--listen", f"127.0.0.1:{port}", "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--namespace", CRIPPLED_NAMESPACE, "--kubeconfig", str(kubeconfig),
                             "--key-rotation-seconds", "10", f"--metrics-listen=127.0.0.1:{metrics_port}"], log)
    context = ssl.create_default_context(cafile=str(ca))
    url = f"https://127.0.0.1:{port}"
    world.scraper.targets["crippled"] = Target(f"http://127.0.0.1:{metrics_port}/metrics",
                                               {"job": "keyless-broker", "namespace": CRIPPLED_NAMESPACE,
                                                "pod": "keyless-broker-0"})
    token_file = world.workdir / "controller-token"
    caller_url = url  # the loop's broker: this one
    try:
        def healthy():
            assert process.poll() is None, tail(log)
            with urllib.request.urlopen(f"{url}/healthz", context=context, timeout=2) as r:
                return r.status == 200
        eventually(lambda: _quiet(healthy), timeout=30, message="crippled broker answering")
        start = world.scraper.mark()
        with asking_in_a_loop(_Elsewhere(caller_url, ca), TARGET, token_file, every=0.2) as outcomes:
            world.scraper.wait_scrapes(12)
        assert outcomes and all(code == 1 and "HTTP 503" in err for code, err in outcomes), outcomes[-1]
        assert '"reason":"registry_not_synced","status":503' in log.read_text()  # its audit log says why
        assert "key writer round failed" in log.read_text()
        crippled = {"namespace": CRIPPLED_NAMESPACE}
        check(world, start, {"KeylessBrokerServerErrors": [crippled], "KeylessBrokerKeyRotationOverdue": [crippled]},
              "broker-rbac-broken")
    finally:
        world.scraper.targets.pop("crippled", None)
        stop_process(process)


class _Elsewhere:
    """What asking_in_a_loop needs of a world, for another broker."""

    def __init__(self, url, ca_file):
        self.broker = type("B", (), {"url": url, "ca_file": ca_file})()


def _quiet(check):
    try:
        return check()
    except OSError:
        return False


def test_tenant_retrying_a_refused_application_fires_webhook_denials(world):
    kubectl(world.control, "create", "role", "app-writer", "-n", OTHER_NAMESPACE, "--verb=create,get",
            "--resource=applications.argoproj.io", check=False)
    kubectl(world.control, "create", "rolebinding", "app-writer", "-n", OTHER_NAMESPACE, "--role=app-writer",
            "--user=other-dev", check=False)
    application = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
                   "metadata": {"name": "into-someone-else", "namespace": OTHER_NAMESPACE},
                   "spec": {"project": OTHER_TENANT,
                            "source": {"repoURL": "https://git.example.com/apps.git", "path": ".", "targetRevision": "HEAD"},
                            "destination": {"server": world.tenant.server, "namespace": "default"}}}
    start = world.scraper.mark()
    deadline = time.monotonic() + 12 * INTERVAL
    refusals = 0
    while time.monotonic() < deadline:
        result = kubectl(world.control, "create", "--dry-run=server", "--as=other-dev", "-f", "-",
                         input=json.dumps(application), check=False)
        assert result.returncode != 0, "the guardrails let an Application into another tenant's cluster"
        refusals += "denied the request" in result.stderr  # (not a webhook timeout on a loaded machine)
    world.scraper.wait_scrapes(2)
    assert refusals > 10
    check(world, start, {"KeylessWebhookDenialsSpike": [{"namespace": "keyless-system"}]}, "webhook-denials")
