"""The manifests the guardrail tests send: what a tenant-a user must not get through (ADVERSARIAL), what
tenants may still do (ALLOWED), and destination-less Applications the mutating webhook completes
(MUTATIONS). test_webhooks_policy.py judges them with the policy alone, test_webhooks_admission.py through
the real API server, bench/bench_webhook.py times them. Each tenant owns the namespace named after it
(NAMESPACE_TENANTS); its users write Applications there, Argo CD's own namespace is for admins.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

from keyless import pki

A_DEV = "https://a-dev.tenant-a.example.com"
A_PROD = "https://a-prod.tenant-a.example.com"
B_DEV = "https://b-dev.tenant-b.example.com"
C_ONE = "https://c-one.tenant-c.example.com"
PLATFORM = "https://platform-tools.example.com"  # not a tenant cluster
IN_CLUSTER = "https://kubernetes.default.svc"
REPO = "https://git.example.com/apps.git"
TENANT = "keyless.dev/tenant"
NAMESPACE_TENANTS = {"tenant-a": "tenant-a", "tenant-b": "tenant-b", "tenant-c": "tenant-c"}
SCRATCH = "scratch"  # a namespace of no tenant where alice may write too
USER_NAMESPACE = {"alice": "tenant-a", "bob": "tenant-b", "carla": "tenant-c"}


CA_DATA = base64.b64encode(pki.new_ca("guardrails-tenant-ca")[0].cert_pem).decode()


def remote_tenant_cluster(name: str, tenant: str, server: str, labels: dict, project: str | None = None,
                          cluster_name: str | None = None) -> dict:
    argocd: dict = {"namespace": "argocd", "labels": labels}
    if project:
        argocd["project"] = project
    if cluster_name:
        argocd["clusterName"] = cluster_name
    return {
        "apiVersion": "keyless.dev/v1alpha1", "kind": "RemoteTenantCluster",
        "metadata": {"name": name, "namespace": tenant, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"tenant": tenant, "server": server, "caData": CA_DATA,
                 "argocd": argocd, "access": {"clusterRole": "cluster-admin"}, "proxy": {"mode": "External"}},
    }


REMOTE_TENANT_CLUSTERS = [
    remote_tenant_cluster("a-dev", "tenant-a", A_DEV, {"environment": "development"}),
    remote_tenant_cluster("a-prod", "tenant-a", A_PROD, {"environment": "production"}),
    remote_tenant_cluster("b-dev", "tenant-b", B_DEV, {"environment": "development"}),
    # A custom project and Argo CD cluster name.
    remote_tenant_cluster("c-one", "tenant-c", C_ONE, {}, project="tenant-c.team", cluster_name="tenant-c-one"),
]


def application(name: str, project: str, destination: dict, labels: dict | None = None,
                namespace: str = "tenant-a") -> dict:
    metadata: dict = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application", "metadata": metadata,
            "spec": {"project": project, "destination": destination,
                     "source": {"repoURL": REPO, "path": "guestbook", "targetRevision": "HEAD"}}}


def template(project: str, destination: dict) -> dict:
    return {"metadata": {"name": "{{name}}-guestbook"},
            "spec": {"project": project, "destination": {"namespace": "guestbook", **destination},
                     "source": {"repoURL": REPO, "path": "guestbook", "targetRevision": "HEAD"}}}


def application_set(name: str, generators: list, project: str = "tenant-a",
                    destination: dict | None = None, namespace: str = "tenant-a", **spec) -> dict:
    destination = {"server": "{{server}}"} if destination is None else destination
    return {"apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationSet",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"generators": generators, "template": template(project, destination), **spec}}


def clusters(selector: dict, **extra) -> dict:
    return {"clusters": {"selector": selector, **extra}}


PINNED_A = {"matchLabels": {TENANT: "tenant-a"}}


@dataclass
class Case:
    name: str
    manifest: dict
    reason: str = "Allowed"
    old: dict | None = None  # for updates: what is stored before
    user: str = "alice"  # alice is in tenant-a's team, bob in tenant-b's
    notes: str = ""
    extra: dict = field(default_factory=dict)


def nested(*generators) -> dict:
    """A matrix inside a matrix: Argo CD keeps the inner one as raw JSON and decodes it itself."""
    return {"matrix": {"generators": [{"matrix": {"generators": list(generators)}}]}}


KELVIN, LONG_S = "\u212a", "\u017f"  # fold to 'k' and 's' in Go's encoding/json


# ---- manifests a tenant-a user must not get through -------------------------------------------
ADVERSARIAL: list[Case] = [
    Case("app-other-tenant-server", application("app-other-tenant-server", "tenant-a", {"server": B_DEV}),
         "CrossTenantDestination"),
    Case("app-other-tenant-name", application("app-other-tenant-name", "tenant-a", {"name": "b-dev"}),
         "CrossTenantDestination"),
    Case("app-own-server-other-name",
         application("app-own-server-other-name", "tenant-a", {"server": A_DEV, "name": "b-dev"}),
         "CrossTenantDestination", notes="name and server both set: each must be the tenant's"),
    Case("app-in-cluster-from-tenant-project",
         application("app-in-cluster-from-tenant-project", "tenant-a", {"server": IN_CLUSTER}),
         "UnregisteredDestination", notes="the control plane itself"),
    Case("app-default-project-to-tenant-name",
         application("app-default-project-to-tenant-name", "default", {"name": "b-dev"}),
         "TenantClusterFromForeignProject"),
    Case("app-default-project-server-spelling",
         application("app-default-project-server-spelling", "default",
                     {"server": "HTTPS://B-DEV.Tenant-B.example.com:443/"}),
         "TenantClusterFromForeignProject", notes="case, default port and trailing slash variants"),
    Case("app-update-moves-to-other-tenant",
         application("app-update-moves-to-other-tenant", "tenant-b", {"server": B_DEV}),
         "ProjectChangeAcrossTenants",
         old=application("app-update-moves-to-other-tenant", "tenant-a", {"server": A_DEV})),
    Case("app-update-moves-to-default-project",
         application("app-update-moves-to-default-project", "default", {"server": A_DEV}),
         "ProjectChangeAcrossTenants",
         old=application("app-update-moves-to-default-project", "tenant-a", {"server": A_DEV})),
    Case("appset-selector-other-tenant",
         application_set("appset-selector-other-tenant", [clusters({"matchLabels": {TENANT: "tenant-b"}})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-selector-empty", application_set("appset-selector-empty", [clusters({})]),
         "ClusterGeneratorNotPinned", notes="an empty selector selects every cluster"),
    Case("appset-selector-environment-only",
         application_set("appset-selector-environment-only",
                         [clusters({"matchLabels": {"environment": "development"}})]),
         "ClusterGeneratorNotPinned", notes="tenant-b also has a development cluster"),
    Case("appset-selector-tenant-key-spelling",
         application_set("appset-selector-tenant-key-spelling",
                         [clusters({"matchLabels": {"Keyless.dev/tenant": "tenant-a", "environment": "development"}})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-expressions-in-two-tenants",
         application_set("appset-expressions-in-two-tenants", [clusters({"matchExpressions": [
             {"key": TENANT, "operator": "In", "values": ["tenant-a", "tenant-b"]}]})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-expressions-notin-other",
         application_set("appset-expressions-notin-other", [clusters({"matchExpressions": [
             {"key": TENANT, "operator": "NotIn", "values": ["tenant-b"]}]})]),
         "ClusterGeneratorNotPinned", notes="NotIn also matches every other tenant"),
    Case("appset-expressions-exists",
         application_set("appset-expressions-exists", [clusters({"matchExpressions": [
             {"key": TENANT, "operator": "Exists"}]})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-selector-templated-tenant-in-matrix",
         application_set("appset-selector-templated-tenant-in-matrix", [{"matrix": {"generators": [
             {"git": {"repoURL": REPO, "revision": "HEAD", "directories": [{"path": "tenants/*"}]}},
             clusters({"matchLabels": {TENANT: "{{path.basename}}"}}),
         ]}}]), "ClusterGeneratorNotPinned"),
    Case("appset-templated-project",
         application_set("appset-templated-project", [clusters(PINNED_A)],
                         project="{{metadata.labels.keyless.dev/tenant}}"),
         "TemplatedProject"),
    Case("appset-gotemplate-project-index",
         application_set("appset-gotemplate-project-index", [clusters(PINNED_A)],
                         project='{{ index .metadata.labels "keyless.dev/tenant" }}',
                         destination={"server": "{{ .server }}"}, goTemplate=True),
         "TemplatedProject"),
    Case("appset-gotemplate-project-constant",
         application_set("appset-gotemplate-project-constant", [clusters(PINNED_A)],
                         project='{{- "tenant-b" -}}', destination={"server": "{{ .server }}"}, goTemplate=True),
         "TemplatedProject", notes="a goTemplate expression that is constant, but not tenant-a"),
    Case("appset-gotemplate-project-printf",
         application_set("appset-gotemplate-project-printf",
                         [clusters(PINNED_A, values={"suffix": "a"})],
                         project='{{ printf "tenant-%s" .values.suffix }}',
                         destination={"server": "{{ .server }}"}, goTemplate=True),
         "TemplatedProject"),
    Case("appset-generator-template-other-project",
         application_set("appset-generator-template-other-project", [clusters(
             PINNED_A, template=template("tenant-b", {"server": "{{server}}"}))]),
         "ProjectOfAnotherTenant", notes="a per-generator template overrides spec.template"),
    Case("appset-generator-template-default-project",
         application_set("appset-generator-template-default-project", [clusters(
             PINNED_A, template=template("default", {"server": "{{server}}"}))]),
         "MixedProjects", notes="a tenant's and no tenant's project in one ApplicationSet"),
    Case("appset-templatepatch-project",
         application_set("appset-templatepatch-project", [clusters(PINNED_A)],
                         destination={"server": "{{ .server }}"}, goTemplate=True,
                         templatePatch='{{ if true }}spec: {project: tenant-b}{{ end }}'),
         "TemplatedTemplatePatch"),
    Case("appset-templatepatch-literal-destination",
         application_set("appset-templatepatch-literal-destination", [clusters(PINNED_A)],
                         templatePatch=f"spec:\n  destination:\n    server: {B_DEV}\n"),
         "CrossTenantDestination"),
    Case("appset-list-other-tenant-server",
         application_set("appset-list-other-tenant-server",
                         [{"list": {"elements": [{"name": "x", "server": B_DEV}]}}]),
         "CrossTenantDestination"),
    Case("appset-destination-from-values",
         application_set("appset-destination-from-values", [clusters(PINNED_A, values={"target": B_DEV})],
                         destination={"server": "{{values.target}}"}),
         "TemplatedDestination"),
    Case("appset-destination-name-from-label",
         application_set("appset-destination-name-from-label", [clusters(PINNED_A)],
                         destination={"name": "{{metadata.labels.environment}}"}),
         "TemplatedDestination"),
    Case("appset-matrix-git-files-feeds-server",
         application_set("appset-matrix-git-files-feeds-server", [{"matrix": {"generators": [
             {"git": {"repoURL": REPO, "revision": "HEAD", "files": [{"path": "clusters/*.json"}]}},
             {"list": {"elements": [{"env": "dev"}]}},
         ]}}]), "UncheckableGenerator", notes="git files can define a server parameter"),
    Case("appset-merge-list-overrides-server",
         application_set("appset-merge-list-overrides-server", [{"merge": {"mergeKeys": ["name"], "generators": [
             clusters(PINNED_A),
             {"list": {"elements": [{"name": "a-dev", "server": B_DEV}]}},
         ]}}]), "CrossTenantDestination"),
    Case("appset-literal-other-tenant-name",
         application_set("appset-literal-other-tenant-name", [clusters(PINNED_A)], destination={"name": "b-dev"}),
         "CrossTenantDestination"),
    Case("appset-default-project-reaches-tenants",
         application_set("appset-default-project-reaches-tenants",
                         [clusters({"matchLabels": {"environment": "development"}})], project="default"),
         "ClusterGeneratorReachesTenants"),
    Case("appset-cluster-decision-resource",
         application_set("appset-cluster-decision-resource", [{"clusterDecisionResource": {
             "configMapRef": "placement", "name": "tenant-a-placement", "requeueAfterSeconds": 60}}]),
         "UncheckableGenerator"),
    Case("appset-update-moves-to-other-tenant",
         application_set("appset-update-moves-to-other-tenant",
                         [clusters({"matchLabels": {TENANT: "tenant-b"}})], project="tenant-b"),
         "ProjectChangeAcrossTenants",
         old=application_set("appset-update-moves-to-other-tenant", [clusters(PINNED_A)])),
    # ---- finding 1: the project switch; judged by the namespace's tenant, not the project's
    Case("app-project-switch-to-other-tenant",
         application("app-project-switch-to-other-tenant", "tenant-b", {"server": B_DEV}),
         "ProjectOfAnotherTenant", notes="project and destination agree, but both are tenant-b's"),
    Case("app-project-switch-by-cluster-name",
         application("app-project-switch-by-cluster-name", "tenant-b", {"name": "b-dev"}), "ProjectOfAnotherTenant"),
    Case("app-in-argocd-namespace", application("app-in-argocd-namespace", "tenant-a", {"server": A_DEV},
                                                namespace="argocd"),
         "ControlNamespaceAdminsOnly", notes="Argo CD's namespace acts for every tenant"),
    Case("app-edit-other-tenants-app-in-argocd-namespace",
         application("app-edit-other-tenants-app-in-argocd-namespace", "tenant-b", {"server": B_DEV},
                     namespace="argocd"), "ControlNamespaceAdminsOnly",
         old=application("app-edit-other-tenants-app-in-argocd-namespace", "tenant-b", {"server": B_DEV},
                         namespace="argocd") | {"spec": {**application("x", "tenant-b", {"server": B_DEV})["spec"],
                                                          "source": {"repoURL": "https://evil.example.com/x.git",
                                                                     "path": "."}}},
         notes="editing only the repository of tenant-b's Application"),
    Case("app-tenant-project-from-unlabelled-namespace",
         application("app-tenant-project-from-unlabelled-namespace", "tenant-a", {"server": A_DEV}, namespace=SCRATCH),
         "TenantProjectOutsideTenantNamespace"),
    Case("app-other-tenant-project-from-unlabelled-namespace",
         application("app-other-tenant-project-from-unlabelled-namespace", "tenant-b", {"server": B_DEV},
                     namespace=SCRATCH), "TenantProjectOutsideTenantNamespace"),
    Case("appset-project-of-other-tenant",
         application_set("appset-project-of-other-tenant", [clusters({"matchLabels": {TENANT: "tenant-b"}})],
                         project="tenant-b"), "ProjectOfAnotherTenant"),
    Case("appset-in-argocd-namespace",
         application_set("appset-in-argocd-namespace", [clusters(PINNED_A)], namespace="argocd"),
         "ControlNamespaceAdminsOnly"),
    Case("appset-template-into-argocd-namespace",
         application_set("appset-template-into-argocd-namespace", [clusters(PINNED_A)]) | {"spec": {
             "generators": [clusters(PINNED_A)],
             "template": template("tenant-a", {"server": "{{server}}"}) | {
                 "metadata": {"name": "{{name}}-x", "namespace": "argocd"}}}},
         "TemplateNamespace"),
    # ---- finding 4: keys as Argo CD's Go decoder reads them
    Case("appset-templatepatch-capitalised-spec",
         application_set("appset-templatepatch-capitalised-spec", [clusters(PINNED_A)],
                         templatePatch=f'{{"Spec": {{"destination": {{"server": "{B_DEV}"}}}}}}'),
         "CrossTenantDestination"),
    Case("appset-templatepatch-capitalised-destination-server",
         application_set("appset-templatepatch-capitalised-destination-server", [clusters(PINNED_A)],
                         templatePatch=f"spec:\n  Destination:\n    Server: {B_DEV}\n"),
         "CrossTenantDestination"),
    Case("appset-templatepatch-long-s-spec",
         application_set("appset-templatepatch-long-s-spec", [clusters(PINNED_A)],
                         templatePatch=f"{LONG_S}pec:\n  project: tenant-b\n"),
         "ProjectOfAnotherTenant", notes="U+017F folds to s"),
    Case("appset-templatepatch-duplicate-spec",
         application_set("appset-templatepatch-duplicate-spec", [clusters(PINNED_A)],
                         templatePatch=f"spec:\n  project: tenant-a\nSpec:\n  destination:\n    server: {B_DEV}\n"),
         "AmbiguousKeys"),
    Case("appset-templatepatch-repeated-key",
         application_set("appset-templatepatch-repeated-key", [clusters(PINNED_A)],
                         templatePatch="spec:\n  project: tenant-a\nspec:\n  project: tenant-b\n"),
         "AmbiguousKeys"),
    Case("appset-nested-capitalised-generators",
         application_set("appset-nested-capitalised-generators", [{"matrix": {"generators": [
             {"matrix": {"Generators": [{"list": {"elements": [{"server": B_DEV}]}}, clusters(PINNED_A)]}}]}}]),
         "CrossTenantDestination", notes="a nested {Generators: [...]} is decoded by Go, so it is read"),
    Case("appset-nested-long-s-clusters",
         application_set("appset-nested-long-s-clusters", [nested({f"clu{LONG_S}ters": {"selector": {}}})]),
         "ClusterGeneratorNotPinned"),
    Case("appset-nested-kelvin-duplicate-key",
         application_set("appset-nested-kelvin-duplicate-key", [nested(clusters({
             "matchLabels": {TENANT: "tenant-a"},
             "matchExpressions": [{"key": TENANT, f"{KELVIN}ey": "environment", "operator": "Exists"}]}))]),
         "AmbiguousKeys", notes="U+212A folds to k: two 'key' keys"),
]

# Refused by the policy, but never reach it through the API server (whose schema drops such keys).
ADVERSARIAL_POLICY_ONLY: list[Case] = [
    Case("app-capitalised-destination-server",
         application("app-capitalised-destination-server", "tenant-a", {"Server": B_DEV}), "CrossTenantDestination"),
    Case("app-duplicate-destination", application("app-duplicate-destination", "tenant-a",
                                                  {"server": A_DEV, "Server": B_DEV}), "AmbiguousKeys"),
]

# ---- what tenants may still do ------------------------------------------------------------------
ALLOWED: list[Case] = [
    Case("own-app-by-server", application("own-app-by-server", "tenant-a", {"server": A_DEV})),
    Case("own-app-by-name", application("own-app-by-name", "tenant-a", {"name": "a-prod", "namespace": "x"})),
    Case("own-app-custom-project", application("own-app-custom-project", "tenant-c.team", {"name": "tenant-c-one"},
                                               namespace="tenant-c"), user="carla"),
    Case("platform-app-default-project",
         application("platform-app-default-project", "default", {"server": PLATFORM})),
    Case("own-appset-pinned-labels",
         application_set("own-appset-pinned-labels",
                         [clusters({"matchLabels": {TENANT: "tenant-a", "environment": "production"}})])),
    Case("own-appset-pinned-expression-gotemplate",
         application_set("own-appset-pinned-expression-gotemplate", [clusters({"matchExpressions": [
             {"key": TENANT, "operator": "In", "values": ["tenant-a"]},
             {"key": "environment", "operator": "NotIn", "values": ["production"]}]})],
             destination={"name": "{{ .name }}"}, goTemplate=True)),
    Case("own-appset-list", application_set("own-appset-list", [{"list": {"elements": [
        {"name": "a-dev", "server": A_DEV}, {"name": "a-prod", "server": A_PROD}]}}])),
    Case("own-appset-matrix-git-directories", application_set("own-appset-matrix-git-directories", [{"matrix": {
        "generators": [{"git": {"repoURL": REPO, "revision": "HEAD", "directories": [{"path": "apps/*"}]}},
                       clusters(PINNED_A)]}}])),
    Case("own-appset-literal-destination-git-files", application_set(
        "own-appset-literal-destination-git-files",
        [{"git": {"repoURL": REPO, "revision": "HEAD", "files": [{"path": "apps/*.json"}]}}],
        destination={"server": A_PROD})),
    Case("own-app-update-keeps-tenant", application("own-app-update-keeps-tenant", "tenant-a", {"server": A_PROD}),
         old=application("own-app-update-keeps-tenant", "tenant-a", {"server": A_DEV})),
    Case("platform-app-from-unlabelled-namespace",
         application("platform-app-from-unlabelled-namespace", "default", {"server": PLATFORM}, namespace=SCRATCH)),
    Case("own-appset-nested-matrix", application_set("own-appset-nested-matrix", [nested(
        {"git": {"repoURL": REPO, "revision": "HEAD", "directories": [{"path": "apps/*"}]}}, clusters(PINNED_A))])),
    Case("own-appset-templatepatch-json", application_set(
        "own-appset-templatepatch-json", [clusters(PINNED_A)],
        templatePatch='{"spec": {"syncPolicy": {"automated": {"prune": true}}}}')),
    Case("own-app-label-keys-differ-only-in-case",
         application("own-app-label-keys-differ-only-in-case", "tenant-a", {"server": A_DEV},
                     labels={"Team": "x", "team": "y"}), notes="label keys are a map: exact, never folded"),
]

# ---- mutation: (case, the server the Application must end up with, or None: no patch) ---------
MUTATIONS: list[tuple[Case, str | None]] = [
    (Case("mutate-by-environment", application("mutate-by-environment", "tenant-a", {"namespace": "guestbook"},
                                               labels={"environment": "production"})), A_PROD),
    (Case("mutate-single-cluster-tenant", application("mutate-single-cluster-tenant", "tenant-b",
                                                      {"namespace": "guestbook"}, namespace="tenant-b"), user="bob"),
     B_DEV),
]
AMBIGUOUS_DESTINATION = Case(
    "mutate-ambiguous", application("mutate-ambiguous", "tenant-a", {"namespace": "guestbook"}), "NoDestination")
