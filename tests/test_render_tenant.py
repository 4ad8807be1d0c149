"""The tenant side of a RemoteTenantCluster: kube-oidc-proxy objects (Managed) and the Direct-mode
AuthenticationConfiguration, pinned as pure rendering and proven against real API servers."""
from __future__ import annotations

import base64
import json
import uuid

import jinja2
import pytest
import yaml
from cryptography import x509

from .helpers import kubectl
from keyless import pki
from keyless.envtest.cluster import ClusterStartError, LocalCluster
from keyless.model import names
from keyless.model.spec import ProxyService, SpecError, parse
from keyless.render import tenant
from keyless.render.tenant import (
    proxy_serving_hostnames,
    render_authentication_configuration,
    render_tenant_proxy,
)
from keyless.settings import OperatorSettings

HOSTILE_USERNAME = 'keyless:team-a:"b\n: c'


def manifest(**overrides) -> dict:
    spec = {
        "tenant": "team-a",
        "server": "https://proxy.team-a.example.com:8443",
        "access": {"clusterRole": "edit"},
        "proxy": {"namespace": "kube-oidc-proxy", "hostnames": ["proxy-alt.example.com"]},
        "bootstrap": {"kubeconfigSecretRef": {"name": "bootstrap"}},
    }
    for key, value in overrides.items():
        spec[key] = value
    return {"metadata": {"namespace": "team-a", "name": "prod"}, "spec": spec}


@pytest.fixture(scope="module")
def issuer_ca():
    return pki.new_cluster_ca("issuer")


@pytest.fixture(scope="module")
def serving(issuer_ca):
    ca_cert, ca_key = pki.new_cluster_ca("team-a/prod")
    cluster = parse(manifest())
    return pki.issue_serving_certificate(ca_cert, ca_key, proxy_serving_hostnames(cluster))


def render(cluster, issuer_ca, serving, settings=None, **kwargs) -> list[dict]:
    cert, key = serving
    return render_tenant_proxy(cluster, settings or OperatorSettings(), serving_cert_pem=cert,
                               serving_key_pem=key, issuer_ca_pem=issuer_ca[0], **kwargs)


def by_kind(objects, kind) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind) -> dict:
    (found,) = by_kind(objects, kind)
    return found


def container(objects) -> dict:
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


# ---- pure rendering -------------------------------------------------------------------------------

def test_objects_come_in_apply_order(issuer_ca, serving):
    assert [o["kind"] for o in render(parse(manifest()), issuer_ca, serving)] == [
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
        "Secret", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
    ]


def test_proxy_flags_are_exactly_the_design_set(issuer_ca, serving):
    cluster = parse(manifest())
    args = container(render(cluster, issuer_ca, serving))["args"]
    assert args == [
        "--secure-port=8443",
        "--tls-cert-file=/etc/kube-oidc-proxy/tls/tls.crt",
        "--tls-private-key-file=/etc/kube-oidc-proxy/tls/tls.key",
        "--oidc-issuer-url=https://keyless-broker.keyless-system.svc",
        "--oidc-client-id=keyless:team-a:prod",
        "--oidc-ca-file=/etc/kube-oidc-proxy/issuer-ca/ca.crt",
        "--oidc-username-claim=sub",
        "--oidc-groups-claim=groups",
        "--oidc-signing-algs=ES256",
        "--readiness-probe-port=8080",
    ]
    assert not any(a.startswith("--oidc-username-prefix") for a in args)


def test_issuer_and_audience_follow_settings_and_spec_and_rs256_is_selectable(issuer_ca, serving):
    cluster = parse(manifest(access={"clusterRole": "edit", "audience": "keyless:team-a:aud-x"}))
    settings = OperatorSettings(broker_issuer="https://broker.example.com/issuer", signing_algorithm="RS256")
    args = container(render(cluster, issuer_ca, serving, settings))["args"]
    assert "--oidc-issuer-url=https://broker.example.com/issuer" in args
    assert "--oidc-client-id=keyless:team-a:aud-x" in args
    assert "--oidc-signing-algs=RS256" in args
    with pytest.raises(ValueError, match="signing algorithm"):
        render(cluster, issuer_ca, serving, OperatorSettings(signing_algorithm="HS256"))


def test_mounted_files_are_the_files_the_flags_name(issuer_ca, serving):
    objects = render(parse(manifest()), issuer_ca, serving)
    c = container(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    secret, config_map = one(objects, "Secret"), one(objects, "ConfigMap")
    assert mounts["/etc/kube-oidc-proxy/tls"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert mounts["/etc/kube-oidc-proxy/issuer-ca"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert secret["type"] == "kubernetes.io/tls"
    assert base64.b64decode(secret["data"]["tls.crt"]) == serving[0]
    assert base64.b64decode(secret["data"]["tls.key"]) == serving[1]
    assert config_map["data"]["ca.crt"] == issuer_ca[0].decode()


def test_pod_is_hardened_probed_and_keeps_its_token(issuer_ca, serving):
    objects = render(parse(manifest()), issuer_ca, serving)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "readiness"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"https": 8443, "readiness": 8080}
    assert "tcpSocket" in c["livenessProbe"]
    assert pod["affinity"]["podAntiAffinity"] and pod["topologySpreadConstraints"]
    assert c["image"] == OperatorSettings().proxy_image
    image = render(parse(manifest(proxy={"image": "registry.example/proxy:1"})), issuer_ca, serving)
    assert container(image)["image"] == "registry.example/proxy:1"


def test_service_maps_443_to_the_secure_port(issuer_ca, serving):
    service = one(render(parse(manifest()), issuer_ca, serving), "Service")
    assert service["spec"]["ports"] == [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}]


def test_pdb_keeps_one_pod_only_when_there_are_two(issuer_ca, serving):
    two = one(render(parse(manifest()), issuer_ca, serving), "PodDisruptionBudget")["spec"]
    assert two["minAvailable"] == 1 and "maxUnavailable" not in two
    single = parse(manifest(proxy={"replicas": 1}))
    lone = one(render(single, issuer_ca, serving), "PodDisruptionBudget")["spec"]
    assert "minAvailable" not in lone and lone["maxUnavailable"] == 1
    assert one(render(single, issuer_ca, serving), "Deployment")["spec"]["replicas"] == 1


def test_selector_matches_pod_labels(issuer_ca, serving):
    objects = render(parse(manifest()), issuer_ca, serving)
    deployment = one(objects, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert one(objects, "Service")["spec"]["selector"] == selector


def test_every_object_carries_ownership_labels_and_owner_annotation(issuer_ca, serving):
    cluster = parse(manifest())
    for obj in render(cluster, issuer_ca, serving):
        assert cluster.ownership_labels().items() <= obj["metadata"]["labels"].items(), obj["kind"]
        assert obj["metadata"]["annotations"][names.ANNOTATION_OWNER] == "team-a/prod", obj["kind"]
        assert not names.ARGOCD_TRACKING_KEYS & set(obj["metadata"]["labels"]), obj["kind"]


def test_impersonation_rules_name_only_the_username_authenticated_group_and_credential_id_plus_access_reviews(
        issuer_ca, serving):
    cluster = parse(manifest(access={"clusterRole": "edit", "username": "keyless:team-a:argocd"}))
    role = one(render(cluster, issuer_ca, serving), "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"],
         "resourceNames": ["keyless:team-a:argocd"]},
        {"apiGroups": [""], "resources": ["groups"], "verbs": ["impersonate"],
         "resourceNames": ["system:authenticated"]},
        {"apiGroups": ["authentication.k8s.io"],
         "resources": ["userextras/authentication.kubernetes.io/credential-id"], "verbs": ["impersonate"]},
        # how the proxy judges a client's own Impersonate-* headers against the tenant's RBAC
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
    ]


def test_proxy_service_exposure_is_rendered_from_the_spec(issuer_ca, serving):
    default = one(render(parse(manifest()), issuer_ca, serving), "Service")
    assert default["spec"]["type"] == "ClusterIP" and "clusterIP" not in default["spec"]
    assert "nodePort" not in default["spec"]["ports"][0]
    cluster = parse(manifest(proxy={"mode": "Managed", "service": {
        "type": "LoadBalancer", "nodePort": 31443, "annotations": {"lb.example.com/scheme": "internal",
                                                                   names.ANNOTATION_OWNER: "forged"}}}))
    service = one(render(cluster, issuer_ca, serving), "Service")
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["ports"][0]["nodePort"] == 31443
    assert service["metadata"]["annotations"]["lb.example.com/scheme"] == "internal"
    assert service["metadata"]["annotations"][names.ANNOTATION_OWNER] == "team-a/prod"  # ours wins
    pinned = parse(manifest(proxy={"mode": "Managed", "service": {"clusterIP": "10.96.0.100"}}))
    assert one(render(pinned, issuer_ca, serving), "Service")["spec"]["clusterIP"] == "10.96.0.100"


def test_proxy_pods_keep_serving_while_endpoints_drain(issuer_ca, serving):
    pod = one(render(parse(manifest()), issuer_ca, serving), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] < pod["terminationGracePeriodSeconds"]


def test_token_groups_are_impersonable_but_system_groups_are_refused(issuer_ca, serving):
    grouped = parse(manifest(access={"clusterRole": "edit", "groups": ["deployers", "system:authenticated"]}))
    role = one(render(grouped, issuer_ca, serving), "ClusterRole")
    assert role["rules"][1]["resourceNames"] == ["system:authenticated", "deployers"]
    masters = parse(manifest(access={"clusterRole": "edit", "groups": ["system:masters"]}))
    with pytest.raises(SpecError, match="system:masters"):
        render(masters, issuer_ca, serving)


def test_bindings_give_the_proxy_impersonation_and_the_username_its_role(issuer_ca, serving):
    cluster = parse(manifest(access={"clusterRole": "edit", "username": "keyless:team-a:argocd"}))
    objects = render(cluster, issuer_ca, serving)
    role = one(objects, "ClusterRole")
    proxy_binding, user_binding = by_kind(objects, "ClusterRoleBinding")
    assert proxy_binding["roleRef"]["name"] == role["metadata"]["name"]
    assert proxy_binding["subjects"] == [{"kind": "ServiceAccount", "name": "kube-oidc-proxy",
                                          "namespace": "kube-oidc-proxy"}]
    assert user_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                       "name": "edit"}
    assert user_binding["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                         "name": "keyless:team-a:argocd"}]
    assert user_binding["metadata"]["name"] != proxy_binding["metadata"]["name"]


def checksum(objects) -> str:
    return one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]["keyless.dev/trust-checksum"]


def test_checksum_changes_with_the_issuer_ca_or_serving_cert_and_only_then(issuer_ca, serving):
    cluster = parse(manifest())
    first = checksum(render(cluster, issuer_ca, serving))
    assert checksum(render(cluster, issuer_ca, serving)) == first
    # Unrelated changes (replicas, image, role) keep the pods running.
    other = parse(manifest(access={"clusterRole": "view"}, proxy={"replicas": 3, "image": "x/y:2"}))
    assert checksum(render(other, issuer_ca, serving)) == first
    assert checksum(render(cluster, pki.new_cluster_ca("rotated"), serving)) != first
    ca_cert, ca_key = pki.new_cluster_ca("reissued")
    reissued = pki.issue_serving_certificate(ca_cert, ca_key, ["proxy.team-a.example.com"])
    assert checksum(render(cluster, issuer_ca, reissued)) != first


def test_hostile_username_stays_one_quoted_string(issuer_ca, serving):
    cluster = parse(manifest(access={"clusterRole": "edit", "username": HOSTILE_USERNAME}))
    objects = render(cluster, issuer_ca, serving)
    role = one(objects, "ClusterRole")
    assert role["rules"][0]["resourceNames"] == [HOSTILE_USERNAME]
    assert by_kind(objects, "ClusterRoleBinding")[1]["subjects"][0]["name"] == HOSTILE_USERNAME
    assert len(role["rules"]) == 4 and set(role) == {"apiVersion", "kind", "metadata", "rules"}


@pytest.mark.parametrize("text", [
    HOSTILE_USERNAME, "a: b\n- c", "#not a comment", "{{ not jinja }}", "'single'", "emoji 😀", "line\u2028sep",
    "del\x7f", "nul\x00", "bom\ufeff", "&anchor *alias !tag",
])
def test_yaml_quote_round_trips_any_string(text):
    assert yaml.safe_load(tenant.yaml_quote(text)) == text
    assert yaml.safe_load(f"key: {tenant.yaml_quote(text)}\nother: 1\n") == {"key": text, "other": 1}


def test_strict_undefined_refuses_a_missing_value():
    with pytest.raises(jinja2.UndefinedError, match="selector"):
        tenant.render_template("proxy-service.yaml.j2", name="kube-oidc-proxy", namespace="x", labels={},
                               annotations={}, replicas=2, service=ProxyService())  # no selector


def test_template_files_match_the_package_data_glob():
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["keyless"]
    templates = sorted(tenant.TEMPLATES.iterdir())
    assert templates
    for path in templates:
        relative = path.relative_to(root / "operator" / "keyless").as_posix()
        assert any(fnmatch(relative, g) for g in globs), relative


def test_serving_certificate_covers_server_host_extra_hostnames_and_service_names():
    cluster = parse(manifest(server="https://10.1.2.3:6443"))
    hostnames = proxy_serving_hostnames(cluster)
    assert hostnames == ("10.1.2.3", "proxy-alt.example.com", "kube-oidc-proxy.kube-oidc-proxy.svc",
                         "kube-oidc-proxy.kube-oidc-proxy.svc.cluster.local", "kube-oidc-proxy.kube-oidc-proxy")
    ca_cert, ca_key = pki.new_cluster_ca("team-a/prod")
    cert_pem, key_pem = pki.issue_serving_certificate(ca_cert, ca_key, hostnames)
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert sans.get_values_for_type(x509.DNSName) == list(hostnames[1:])
    ca = x509.load_pem_x509_certificate(ca_cert)
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"PRIVATE KEY" in key_pem


def test_authentication_configuration_trusts_one_issuer_for_one_audience(issuer_ca):
    text = render_authentication_configuration("https://broker.example.com", HOSTILE_USERNAME, issuer_ca[0])
    assert yaml.safe_load(text) == {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "AuthenticationConfiguration",
        "jwt": [{
            "issuer": {"url": "https://broker.example.com", "audiences": [HOSTILE_USERNAME],
                       "certificateAuthority": issuer_ca[0].decode()},
            "claimMappings": {"username": {"claim": "sub", "prefix": ""},
                              "groups": {"claim": "groups", "prefix": ""}},
        }],
    }
    with pytest.raises(ValueError):
        render_authentication_configuration("https://b", "a", issuer_ca[0], algorithm="none")


# ---- against real API servers ---------------------------------------------------------------------

def can_i(cluster, as_user: str, *args: str) -> bool:
    result = kubectl(cluster, "auth", "can-i", *args, f"--as={as_user}", check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


def may_impersonate_credential_id(cluster, user: str) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                 "resourceAttributes": {"verb": "impersonate", "group": "authentication.k8s.io",
                                        "resource": "userextras",
                                        "subresource": "authentication.kubernetes.io/credential-id"}},
    }
    result = kubectl(cluster, "create", "-f", "-", "-o", "json", input=json.dumps(review))
    return json.loads(result.stdout)["status"]["allowed"]


def resource_versions(cluster, documents: str) -> dict[str, str]:
    listed = json.loads(kubectl(cluster, "get", "-f", "-", "-o", "json", input=documents).stdout)
    items = listed["items"] if "items" in listed else [listed]
    return {f'{i["kind"]}/{i["metadata"]["name"]}': i["metadata"]["resourceVersion"] for i in items}


@pytest.mark.cluster
def test_rendered_proxy_applies_server_side_and_grants_only_the_one_impersonation(tenant_cluster, issuer_ca,
                                                                                  serving):
    proxy_namespace = f"proxy-{uuid.uuid4().hex[:8]}"
    username = f"keyless:team-a:{proxy_namespace}"
    # Our own role: the built-in aggregated roles are filled by a controller, later than we look.
    role = f"keyless-test-{proxy_namespace}"
    cluster = parse(manifest(access={"clusterRole": role, "username": username},
                             proxy={"namespace": proxy_namespace}))
    objects = render(cluster, issuer_ca, serving)
    documents = "---\n".join(yaml.safe_dump(o) for o in objects)
    kubectl(tenant_cluster, "create", "clusterrole", role, "--verb=list", "--resource=deployments.apps")
    try:
        kubectl(tenant_cluster, "apply", "--server-side", "--field-manager=keyless-test", "-f", "-",
                input=documents)
        before = resource_versions(tenant_cluster, documents)
        assert len(before) == len(objects)
        # Applying the same objects again writes nothing: no field the server defaults fights ours.
        kubectl(tenant_cluster, "apply", "--server-side", "--field-manager=keyless-test", "-f", "-",
                input=documents)
        assert resource_versions(tenant_cluster, documents) == before
        deployment = json.loads(kubectl(tenant_cluster, "get", "deployment", "kube-oidc-proxy", "-n",
                                        proxy_namespace, "-o", "json").stdout)
        assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == container(objects)["args"]

        proxy = f"system:serviceaccount:{proxy_namespace}:kube-oidc-proxy"
        assert can_i(tenant_cluster, proxy, "impersonate", f"users/{username}")
        assert not can_i(tenant_cluster, proxy, "impersonate", "users/keyless:team-b:argocd")
        assert not can_i(tenant_cluster, proxy, "impersonate", "users/admin")
        assert can_i(tenant_cluster, proxy, "impersonate", "groups/system:authenticated")
        assert not can_i(tenant_cluster, proxy, "impersonate", "groups/system:masters")
        assert not can_i(tenant_cluster, proxy, "impersonate", "serviceaccounts", "-n", proxy_namespace)
        assert may_impersonate_credential_id(tenant_cluster, proxy)
        assert not can_i(tenant_cluster, proxy, "get", "secrets", "-n", proxy_namespace)
        assert not can_i(tenant_cluster, proxy, "list", "secrets", "--all-namespaces")
        # The username gets its role and nothing that would let it become someone else.
        assert can_i(tenant_cluster, username, "list", "deployments", "-n", proxy_namespace)
        assert not can_i(tenant_cluster, username, "impersonate", f"users/{username}")
        assert not can_i(tenant_cluster, username, "impersonate", "groups/system:authenticated")
        assert not may_impersonate_credential_id(tenant_cluster, username)
    finally:
        kubectl(tenant_cluster, "delete", "--ignore-not-found", "--wait=false", "-f", "-", input=documents,
                check=False)
        kubectl(tenant_cluster, "delete", "clusterrole", role, "--ignore-not-found", check=False)


@pytest.mark.cluster
def test_api_server_starts_with_the_rendered_authentication_configuration(tmp_path, issuer_ca):
    document = render_authentication_configuration("https://keyless-broker.example.com/issuer",
                                                   "keyless:team-a:prod", issuer_ca[0])
    cluster = LocalCluster("direct-authn", tmp_path / "direct", controller_manager=False,
                           authentication_config=document)
    try:
        cluster.start()
        assert cluster.running()
    finally:
        cluster.stop()


@pytest.mark.cluster
def test_api_server_refuses_to_start_with_a_broken_authentication_configuration(tmp_path):
    """Guards the test above: the API server does validate the file it is given at start."""
    broken = ("apiVersion: apiserver.config.k8s.io/v1\nkind: AuthenticationConfiguration\n"
              "jwt:\n- issuer:\n    url: http://insecure\n")
    cluster = LocalCluster("direct-broken", tmp_path / "broken", controller_manager=False,
                           authentication_config=broken)
    try:
        with pytest.raises(ClusterStartError, match="kube-apiserver exited"):
            cluster.start(timeout=60)
    finally:
        cluster.stop()


def test_impersonable_service_accounts_get_one_role_per_namespace_naming_only_them(issuer_ca, serving):
    cluster = parse(manifest(access={"clusterRole": "edit", "impersonation": {"serviceAccounts": [
        {"namespace": "apps", "name": "deployer"}, {"namespace": "apps", "name": "pruner"},
        {"namespace": "web", "name": "deployer"}, {"namespace": "apps", "name": "deployer"}]}}))
    objects = render(cluster, issuer_ca, serving)
    roles = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "Role"}
    assert roles["apps"]["rules"] == [{"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["impersonate"],
                                       "resourceNames": ["deployer", "pruner"]}]
    assert roles["web"]["rules"][0]["resourceNames"] == ["deployer"]
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert {b["metadata"]["namespace"] for b in bindings} == {"apps", "web"}
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "kube-oidc-proxy", "namespace": "kube-oidc-proxy"}]
               for b in bindings)
    assert not [o for o in render(parse(manifest()), issuer_ca, serving) if o["kind"] in ("Role", "RoleBinding")]
    # The proxy then records the real requester in audit extras: only those, the username's value named.
    audit_rules = [r for r in one(objects, "ClusterRole")["rules"] if "originaluser" in r["resources"][0]]
    assert [r["resources"][0].rsplit("-", 1)[-1] for r in audit_rules] == ["user", "groups", "extra"]
    assert audit_rules[0]["resourceNames"] == [cluster.access.username]
