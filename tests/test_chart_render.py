"""The Helm chart, statically: real `helm lint`/`helm template`, and what it renders checked against the
repository's CRDs and policies, the command-line parsers, the Python webhook renderer and the image."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml

from keyless.cli import build_parser

from .chart_fixtures import (ARGOCD_NAMESPACE, CHART, OPERATOR_USER, PKI_NAMESPACE, RELEASE_NAMESPACE, TENANT_NAMESPACE,
                             IMAGE_VALUES, WEBHOOK_VALUES, container, find, helm, render, template)
from .conftest import ROOT, require_binary

pytestmark = require_binary("helm")


def test_chart_crds_are_byte_identical_copies_of_the_repository_crds():
    ours = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert ours, "no CRDs in crds/"
    assert chart == ours, "charts/keyless/files/crds/ differs from crds/: run `cp crds/*.yaml charts/keyless/files/crds/`"


def test_rendered_crds_are_the_repository_crds_plus_chart_labels_and_keep_policy():
    docs = render()
    rendered = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    for path in (ROOT / "crds").glob("*.yaml"):
        source = yaml.safe_load(path.read_text())
        crd = rendered.pop(source["metadata"]["name"])
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == "keyless"
        crd.pop("metadata"), source.pop("metadata")
        assert crd == source
    assert not rendered
    assert not [d for d in render("--set", "crds.install=false") if d["kind"] == "CustomResourceDefinition"]


@pytest.mark.parametrize("values", [[], WEBHOOK_VALUES], ids=["defaults", "webhooks-enabled"])
def test_helm_lint_passes_strictly(values):
    result = helm("lint", "--strict", str(CHART), "--namespace", RELEASE_NAMESPACE, *IMAGE_VALUES, *values)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values, complaint", [
    (["--set", "operator.replicas=0"], "/operator/replicas"),
    (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
    (["--set", "broker.issuer=http://keyless.example.com"], "/broker/issuer"),
    (["--set", "operator.replica=2"], "replica"),  # a typo is refused, not silently ignored
    (["--set-json", "argocd.namespaces=[]"], "/argocd/namespaces"),
    (["--set", "podSecurityContext.runAsNonRoot=false"], "/podSecurityContext/runAsNonRoot"),
    (["--set", "broker.tls.certManager.enabled=true"], "issuerRef"),
], ids=["no-replicas", "pull-policy", "http-issuer", "unknown-key", "no-argocd-namespace", "root", "issuer-missing"])
def test_values_schema_rejects_bad_values(values, complaint):
    result = template(*values, check=False)
    assert result.returncode != 0
    assert "schema" in result.stderr and complaint in result.stderr, result.stderr
    lint = helm("lint", str(CHART), *IMAGE_VALUES, *values, check=False)
    assert lint.returncode != 0


def test_chart_has_no_published_looking_default_image_and_says_what_to_set():
    """Nothing is published: without image.repository, `helm template` (the same rendering as
    `helm install`) stops and says what to set (`helm lint` reports a missing required value only as INFO)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == ""
    result = helm("template", "keyless", str(CHART), "--namespace", RELEASE_NAMESPACE, check=False)
    assert result.returncode != 0
    assert "image.repository is not set" in result.stderr and "Dockerfile" in result.stderr, result.stderr
    images = {c["image"] for d in render("--set", "image.repository=registry.example.com/keyless", *WEBHOOK_VALUES)
              if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {"registry.example.com/keyless:" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]}
    readme = (ROOT / "README.md").read_text()
    assert "--set image.repository=" in readme and "not published" in readme


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a mapping that repeats a key (PyYAML silently keeps the last; Helm and kustomize do not)."""


def _unique_mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"repeated keys {repeated}", node.start_mark)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


@pytest.mark.parametrize("path", ["values.yaml", "argocd-values.yaml"])
def test_values_files_repeat_no_key_and_name_no_published_looking_image(path):
    text = (CHART / path).read_text()
    yaml.load(text, Loader=_UniqueKeyLoader)
    assert "ghcr.io" not in text and "docker.io" not in text


def test_chart_refuses_to_mix_tenant_or_argocd_secrets_with_the_broker_signing_keys():
    result = template("--set-json", f'tenantNamespaces=["{RELEASE_NAMESPACE}"]', check=False)
    assert result.returncode != 0 and "signing keys" in result.stderr
    result = template("--set-json", f'argocd.namespaces=["{RELEASE_NAMESPACE}"]', check=False)
    assert result.returncode != 0 and "signing keys" in result.stderr
    result = template(*WEBHOOK_VALUES[:2], check=False)  # webhooks without a CA bundle or cert-manager
    assert result.returncode != 0 and "caBundle" in result.stderr


def test_secrets_are_granted_only_by_namespaced_roles_in_the_intended_namespaces():
    docs = render("--set-json", f'tenantNamespaces=["{TENANT_NAMESPACE}"]', *WEBHOOK_VALUES)
    for role in (d for d in docs if d["kind"] == "ClusterRole"):
        for rule in role["rules"]:
            assert "secrets" not in rule["resources"] and "*" not in rule["resources"], role["metadata"]["name"]
            assert "*" not in rule["verbs"], role["metadata"]["name"]

    def secret_verbs(namespace: str, role_name: str) -> set[str]:
        role = find(docs, "Role", role_name, namespace)
        return {v for r in role["rules"] if "secrets" in r["resources"] and not r.get("resourceNames")
                for v in r["verbs"]}

    assert secret_verbs(ARGOCD_NAMESPACE, "keyless-operator-argocd") == {"get", "list", "watch", "create", "patch",
                                                                          "delete"}
    assert secret_verbs(TENANT_NAMESPACE, "keyless-operator-bootstrap") == {"get", "delete"}
    # Proxy CA Secrets of Managed mode live in their own namespace, by name only (no list or watch);
    # the operator has no Secret right at all in the release namespace, home of the signing keys.
    assert secret_verbs(PKI_NAMESPACE, "keyless-operator-pki") == {"get", "create", "patch", "delete"}
    holders = {(d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs if d["kind"] == "Role"
               and any("secrets" in r["resources"] for r in d["rules"])}
    assert holders == {(ARGOCD_NAMESPACE, "keyless-operator-argocd"), (TENANT_NAMESPACE, "keyless-operator-bootstrap"),
                       (PKI_NAMESPACE, "keyless-operator-pki"), (RELEASE_NAMESPACE, "keyless-broker")}


def test_every_pod_runs_locked_down_and_the_operator_runs_as_leader_and_standby():
    docs = render(*WEBHOOK_VALUES)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"keyless-operator", "keyless-broker", "keyless-webhooks"}
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert c["livenessProbe"] and c["readinessProbe"]
    operator = find(docs, "Deployment", "keyless-operator")
    assert operator["spec"]["replicas"] == 2
    args = container(docs, "keyless-operator")["args"]
    assert "--leader-election" in args and f"--leader-election-namespace={RELEASE_NAMESPACE}" in args
    token_volume = next(v for v in operator["spec"]["template"]["spec"]["volumes"] if v["name"] == "broker-token")
    projected = token_volume["projected"]["sources"][0]["serviceAccountToken"]
    assert projected["audience"] == "keyless-broker" and projected["expirationSeconds"] == 3600
    broker = find(docs, "Deployment", "keyless-broker")
    assert broker["spec"]["replicas"] == 2
    pdb = find(docs, "PodDisruptionBudget", "keyless-broker")
    assert pdb["spec"]["selector"]["matchLabels"] == broker["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] == 1
    probes = container(docs, "keyless-broker")
    assert probes["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "https", "scheme": "HTTPS"}
    assert probes["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "https", "scheme": "HTTPS"}
    tls_volume = next(v for v in broker["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls_volume["secret"]["secretName"] == "keyless-broker-tls"


def test_container_args_are_accepted_by_the_real_command_line_parsers():
    docs = render(*WEBHOOK_VALUES)
    parser = build_parser()
    operator = parser.parse_args(container(docs, "keyless-operator")["args"])
    assert operator.argocd_namespace == [ARGOCD_NAMESPACE] and operator.leader_election
    broker = parser.parse_args(container(docs, "keyless-broker")["args"])
    assert broker.issuer == f"https://keyless-broker.{RELEASE_NAMESPACE}.svc"
    assert broker.operator_identity == OPERATOR_USER
    assert broker.workers == 1
    workers = parser.parse_args(container(render("--set", "broker.workers=2"), "keyless-broker")["args"])
    assert workers.workers == 2
    webhooks = container(docs, "keyless-webhooks")
    assert "command" not in webhooks  # the image's entry point, `keyless`: the chart runs `keyless webhooks`
    assert webhooks["args"][0] == "webhooks"
    assert parser.parse_args(webhooks["args"]).argocd_namespace == [ARGOCD_NAMESPACE]


def test_webhook_configurations_have_the_shape_the_python_renderer_produces():
    from keyless.webhooks import configuration
    from keyless.webhooks.policy import Exemptions

    docs = render(*WEBHOOK_VALUES, "--set-json", 'argocd.namespaces=["argocd","team-argocd"]',
                  "--set-json", 'webhooks.adminUsers=["alice"]')
    ca = b"test-ca"
    client_config = functools.partial(configuration.service_client_config, RELEASE_NAMESPACE, "keyless-webhooks",
                                      443, ca)
    namespaces = ["argocd", "team-argocd"]
    expected = [
        configuration.render_validating_webhook_configuration(
            client_config, exemptions=Exemptions.build(["alice"], argocd_namespaces=namespaces)),
        configuration.render_mutating_webhook_configuration(client_config),
    ]
    for want in expected:
        got = find(docs, want["kind"], want["metadata"]["name"])
        assert got["metadata"]["labels"].items() >= want["metadata"]["labels"].items()
        assert got["webhooks"] == want["webhooks"]


def _policy_documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _without_chart_labels(doc: dict) -> dict:
    doc = json.loads(json.dumps(doc))
    doc["metadata"]["labels"] = {"app.kubernetes.io/name": "keyless"}
    return doc


def test_tenancy_admission_policies_are_the_repositorys_policies():
    source = ROOT / "policies" / "remotetenantcluster-tenancy.yaml"
    assert (CHART / "files" / "policies" / source.name).read_bytes() == source.read_bytes(), \
        "charts/keyless/files/policies/ differs from policies/: run `cp policies/remotetenantcluster-tenancy.yaml " \
        "charts/keyless/files/policies/`"
    docs = render()
    rendered = {(d["kind"], d["metadata"]["name"]): _without_chart_labels(d) for d in docs
                if d["kind"].startswith("ValidatingAdmissionPolicy")}
    expected = [*_policy_documents(source), *_policy_documents(ROOT / "policies" / "namespace-tenant-label.yaml")]
    assert rendered == {(d["kind"], d["metadata"]["name"]): d for d in expected}
    for doc in docs:
        if doc["kind"].startswith("ValidatingAdmissionPolicy"):
            assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "keyless"
    admins = render("--set-json", 'tenancy.namespaceLabelAdmins={"users":["root"],"groups":["platform-admins"]}')
    policy = find(admins, "ValidatingAdmissionPolicy", "keyless-namespace-tenant-label")
    assert '["root"]' in policy["spec"]["validations"][0]["expression"]
    assert '["platform-admins"]' in policy["spec"]["validations"][0]["expression"]
    assert not [d for d in render("--set", "tenancy.protectNamespaceLabel=false")
                if d["metadata"]["name"] == "keyless-namespace-tenant-label"]
    assert not [d for d in render("--set", "tenancy.admissionPolicies=false")
                if d["kind"].startswith("ValidatingAdmissionPolicy")]


def test_argocd_values_add_the_agent_sidecar_with_its_own_token_and_a_read_only_shared_memory_volume():
    values = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]
    volumes = {v["name"]: v for v in values["volumes"]}
    (agent,) = values["extraContainers"]
    args = build_parser().parse_args(agent["args"])
    assert args.command == "agent"
    operator_args = build_parser().parse_args(container(render(), "keyless-operator")["args"])
    # The agent writes exactly where the operator's exec command (`cat <dir>/<target>.json`) reads.
    assert args.dir == operator_args.credential_dir == "/var/run/keyless/credentials"
    assert args.broker_url == operator_args.exec_broker_url
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    for path in (args.dir, str(Path(args.token_file).parent), str(Path(args.broker_ca_file).parent)):
        assert mounts[path]["name"] in volumes
    credentials = volumes[mounts[args.dir]["name"]]
    assert credentials["emptyDir"]["medium"] == "Memory"
    assert not mounts[args.dir].get("readOnly")
    (controller_mount,) = values["volumeMounts"]
    assert controller_mount == {"name": mounts[args.dir]["name"], "mountPath": args.dir, "readOnly": True}
    token = volumes[mounts[str(Path(args.token_file).parent)]["name"]]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "keyless-broker", "expirationSeconds": 3600, "path": Path(args.token_file).name}
    # The credential files are 0600: the agent must run as the controller's user (999) to share them.
    assert agent["securityContext"]["runAsUser"] == 999
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True


def test_dockerfile_builds_one_non_root_image_with_the_keyless_entrypoint():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith(("#", " "))]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    user = [rest for op, rest in instructions if op == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert json.loads(next(rest for op, rest in instructions if op == "ENTRYPOINT")) == ["keyless"]
    chart_uid = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"]
    assert user[-1].split(":")[0] == str(chart_uid)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!operator/" in ignored and "!pyproject.toml" in ignored


def test_cert_manager_issues_the_serving_certificates_the_pods_mount():
    issuer_ref = ["--set", "broker.tls.certManager.enabled=true", "--set", "broker.tls.certManager.issuerRef.name=ca",
                  "--set", "broker.tls.certManager.issuerRef.kind=ClusterIssuer",
                  "--set", "broker.issuer=https://keyless.example.com",
                  "--set", "webhooks.enabled=true", "--set", "webhooks.tls.certManager.enabled=true",
                  "--set", "webhooks.tls.certManager.issuerRef.name=ca"]
    docs = render(*issuer_ref)
    for name, service_host in (("keyless-broker", "keyless-broker.keyless-system.svc"),
                               ("keyless-webhooks", "keyless-webhooks.keyless-system.svc")):
        certificate = find(docs, "Certificate", name, RELEASE_NAMESPACE)
        volume = next(v for v in find(docs, "Deployment", name)["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "tls")
        assert certificate["spec"]["secretName"] == volume["secret"]["secretName"]
        assert service_host in certificate["spec"]["dnsNames"]
        assert certificate["spec"]["issuerRef"]["name"] == "ca"
    # The issuer's own host must be in the broker's certificate: tenant clusters dial it for discovery.
    assert "keyless.example.com" in find(docs, "Certificate", "keyless-broker")["spec"]["dnsNames"]
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        webhook = find(docs, kind, "keyless-tenant-guardrails")
        assert webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            f"{RELEASE_NAMESPACE}/keyless-webhooks"


def test_broker_ca_is_published_where_the_agent_sidecar_reads_it():
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    docs = render("--set", f"broker.tls.caCert={pem}", "--set-json", 'argocd.namespaces=["argocd","team-argocd"]')
    agent_values = yaml.safe_load((CHART / "argocd-values.yaml").read_text())["controller"]
    (ca_volume,) = [v for v in agent_values["volumes"] if "configMap" in v]
    for namespace in ("argocd", "team-argocd"):
        config_map = find(docs, "ConfigMap", ca_volume["configMap"]["name"], namespace)
        assert config_map["data"]["ca.crt"] == pem
    assert not [d for d in render() if d["kind"] == "ConfigMap"]


def test_fullname_override_prefixes_every_object_the_chart_names_and_the_identities_follow():
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    docs = render("--set", "fullnameOverride=acme", "--set", f"broker.tls.caCert={pem}", *WEBHOOK_VALUES,
                  "--set", "broker.tls.certManager.enabled=true", "--set", "broker.tls.certManager.issuerRef.name=ca",
                  "--set", "monitoring.serviceMonitors.enabled=true", "--set", "monitoring.prometheusRule.enabled=true")
    # Names the chart does not choose: the API's CRDs, the tenancy policies shared with policies/ (non-Helm
    # installs), and the PKI namespace (a value of its own).
    fixed = {"CustomResourceDefinition", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "Namespace"}
    named = [(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] not in fixed]
    assert named and [n for n in named if not n[1].startswith("acme-") and n[1] != "acme"] == []
    assert {d["metadata"]["labels"]["app.kubernetes.io/name"] for d in docs} == {"keyless"}
    operator_args = build_parser().parse_args(container(docs, "acme-operator")["args"])
    broker_args = build_parser().parse_args(container(docs, "acme-broker")["args"])
    assert broker_args.operator_identity == f"system:serviceaccount:{RELEASE_NAMESPACE}:acme-operator"
    assert operator_args.broker_url == f"https://acme-broker.{RELEASE_NAMESPACE}.svc" == broker_args.issuer
    lease = find(docs, "Role", "acme-operator")["rules"]
    assert operator_args.leader_election_name == "acme-operator"
    assert any(r.get("resourceNames") == ["acme-operator"] and "leases" in r["resources"] for r in lease)
    webhook = find(docs, "ValidatingWebhookConfiguration", "acme-tenant-guardrails")
    assert {w["clientConfig"]["service"]["name"] for w in webhook["webhooks"]} == {"acme-webhooks"}
    assert "acme-broker" in find(docs, "Certificate", "acme-broker")["spec"]["dnsNames"]
    # Every binding names the ServiceAccount its component runs as.
    for component in ("operator", "broker", "webhooks"):
        pod = find(docs, "Deployment", f"acme-{component}")["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == f"acme-{component}"
        find(docs, "ServiceAccount", f"acme-{component}")


def test_default_names_are_the_release_prefixed_components_and_another_release_gets_its_own():
    defaults = {d["metadata"]["name"] for d in render(*WEBHOOK_VALUES) if d["kind"] == "Deployment"}
    assert defaults == {"keyless-operator", "keyless-broker", "keyless-webhooks"}
    other = [d for d in yaml.safe_load_all(helm("template", "team", str(CHART), "--namespace", RELEASE_NAMESPACE,
                                                *IMAGE_VALUES, "--set", "nameOverride=guard").stdout) if d]
    assert {d["metadata"]["name"] for d in other if d["kind"] == "Deployment"} == {"team-guard-operator",
                                                                                   "team-guard-broker"}
    # The CRDs and the tenancy policies keep the repository's own labels (they are the same objects as crds/
    # and policies/); everything else carries the chart's name.
    shared = ("CustomResourceDefinition", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
    assert {d["metadata"]["labels"]["app.kubernetes.io/name"] for d in other if d["kind"] not in shared} == {"guard"}


def test_service_account_values_use_an_existing_account_or_annotate_the_created_one():
    docs = render("--set", "operator.serviceAccount.create=false", "--set", "operator.serviceAccount.name=platform-op",
                  "--set", "broker.serviceAccount.annotations.iam\\.example\\.com/role=keyless-broker", *WEBHOOK_VALUES)
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    assert "platform-op" not in accounts and "keyless-operator" not in accounts  # not created: it exists
    assert accounts["keyless-broker"]["metadata"]["annotations"] == {"iam.example.com/role": "keyless-broker"}
    assert find(docs, "Deployment", "keyless-operator")["spec"]["template"]["spec"]["serviceAccountName"] == "platform-op"
    subjects = [s for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding") and
                d["metadata"]["name"].startswith("keyless-operator") for s in d["subjects"]]
    assert subjects and {s["name"] for s in subjects} == {"platform-op"}
    broker_args = build_parser().parse_args(container(docs, "keyless-broker")["args"])
    assert broker_args.operator_identity == f"system:serviceaccount:{RELEASE_NAMESPACE}:platform-op"


def test_the_charts_operator_defaults_are_the_operators_own():
    from keyless import settings

    values = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    assert values["proxyImage"] == settings.DEFAULT_PROXY_IMAGE
    assert values["credentialDir"] == settings.DEFAULT_CREDENTIAL_DIR
    assert values["resyncSeconds"] == settings.OperatorSettings().resync_seconds
    assert values["execMode"] == settings.ExecSettings().mode
