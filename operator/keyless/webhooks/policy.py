"""The tenant guardrail decisions for Argo CD Applications and ApplicationSets (pure, no I/O).

The rule: a request is judged by the tenant of the namespace the object lives in (Argo CD's
"applications in any namespace"). There, only that tenant's projects (or projects of no tenant) may
be used; a tenant's project reaches only that tenant's clusters, and a tenant's cluster is reached
only from that tenant's projects. Objects in Argo CD's own namespaces act for every tenant: only
admins write those. Keys are read the way Argo CD's Go code decodes them (`keys`), so `Spec` or a
nested `Generators` cannot hide anything. Everything that could bend the rule at generation time
(templated projects, templated destinations fed by unchecked generators, templatePatch,
per-generator templates, cluster generators that do not pin the tenant label) is refused for
non-admins, with a message that says what is allowed instead.

Each check returns a `Decision`; callers (the kopf handlers) turn a denial into an admission error.
Admins are exempted by the caller (`Exemptions`), never by these functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import yaml

from keyless.model.names import LABEL_TENANT

from .directory import TenantCluster, TenantDirectory
from .keys import AmbiguousKeys, DuplicateKey, canonical, load_strict

# Argo CD's own controllers act for every tenant: their writes are not tenant requests.
ARGOCD_CONTROLLER_ACCOUNTS = ("argocd-application-controller", "argocd-applicationset-controller", "argocd-server")
DEFAULT_ADMIN_GROUPS = ("system:masters",)
DEFAULT_ENVIRONMENT_LABEL = "environment"

# The only templated destinations allowed: the selected cluster's own server or name parameter,
# in fasttemplate ({{server}}) or goTemplate ({{ .server }}) spelling.
_DESTINATION_PARAMETER = re.compile(r"^\{\{-?\s*\.?(server|name|nameNormalized)\s*-?\}\}$")


def argocd_controller_users(argocd_namespace: str = "argocd") -> tuple[str, ...]:
    return tuple(f"system:serviceaccount:{argocd_namespace}:{sa}" for sa in ARGOCD_CONTROLLER_ACCOUNTS)


@dataclass(frozen=True)
class Exemptions:
    """Who the guardrails do not apply to: platform admins and Argo CD's own controllers."""

    users: frozenset[str] = frozenset(argocd_controller_users())
    groups: frozenset[str] = frozenset(DEFAULT_ADMIN_GROUPS)

    @classmethod
    def build(cls, admin_users=(), admin_groups=DEFAULT_ADMIN_GROUPS,
              argocd_namespaces=("argocd",)) -> "Exemptions":
        users = set(admin_users)
        for namespace in argocd_namespaces:
            users.update(argocd_controller_users(namespace))
        return cls(users=frozenset(users), groups=frozenset(admin_groups))

    def exempts(self, userinfo: Mapping[str, Any] | None) -> bool:
        userinfo = userinfo or {}
        if userinfo.get("username") in self.users:
            return True
        return any(group in self.groups for group in userinfo.get("groups") or ())


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # a CamelCase cause, stable for tests and metrics
    message: str = ""


ALLOWED = Decision(True, "Allowed")


def _deny(reason: str, message: str) -> Decision:
    return Decision(False, reason, message)


def _spec(obj: Mapping | None) -> Mapping:
    spec = (obj or {}).get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _is_templated(value: str) -> bool:
    return "{{" in value


def _describe_clusters(clusters: tuple[TenantCluster, ...], limit: int = 10) -> str:
    if not clusters:
        return "(none registered yet)"
    shown = ", ".join(f"{c.name} ({c.server})" for c in clusters[:limit])
    return shown if len(clusters) <= limit else f"{shown} and {len(clusters) - limit} more"


def _allowed_instead(directory: TenantDirectory, tenant: str) -> str:
    return (f"Tenant {tenant} may deploy to: {_describe_clusters(directory.clusters_of(tenant))}; "
            f"set destination.server or destination.name to one of them.")


def _owner_projects(directory: TenantDirectory, tenants: frozenset[str]) -> str:
    return ", ".join(p for t in sorted(tenants) for p in directory.projects_of(t))


# ---- whose request it is: the tenant of the object's namespace ---------------------------------

@dataclass(frozen=True)
class _Place:
    namespace: str
    tenant: str | None  # None: a namespace of no tenant
    denial: Decision | None = None


def _place(directory: TenantDirectory, obj: Mapping, kind: str) -> _Place:
    metadata = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    namespace = _text(metadata.get("namespace"))
    if directory.is_control_namespace(namespace):
        return _Place(namespace, None, _deny(
            "ControlNamespaceAdminsOnly",
            f"{kind}s in Argo CD's namespace {namespace} act for every tenant, so only platform admins may "
            f"write them. Create it in a namespace of your tenant (labelled {LABEL_TENANT}: <tenant>), where "
            f"Argo CD accepts it for your tenant's projects."))
    return _Place(namespace, directory.tenant_of_namespace(namespace))


def _namespaces_text(directory: TenantDirectory, tenant: str) -> str:
    return ", ".join(directory.namespaces_of(tenant)) or "none yet"


# ---- which tenant a project belongs to --------------------------------------------------------

@dataclass(frozen=True)
class _ProjectOwner:
    tenant: str | None  # None: not a tenant project
    denial: Decision | None = None


def _project_owner(directory: TenantDirectory, place: _Place, project: str, where: str, kind: str) -> _ProjectOwner:
    """The project's tenant, which must be the tenant of the namespace the object lives in."""
    owner = directory.tenant_of_project(project)
    if place.tenant is not None and owner is not None and owner != place.tenant:
        own = ", ".join(directory.projects_of(place.tenant)) or place.tenant
        return _ProjectOwner(None, _deny(
            "ProjectOfAnotherTenant",
            f"{where} {project!r} belongs to tenant {owner}, but this {kind} lives in namespace {place.namespace} "
            f"of tenant {place.tenant}. Use a project of tenant {place.tenant} ({own})."))
    if place.tenant is None and owner is not None:
        return _ProjectOwner(None, _deny(
            "TenantProjectOutsideTenantNamespace",
            f"{where} {project!r} belongs to tenant {owner}; its {kind}s must live in one of its namespaces "
            f"({_namespaces_text(directory, owner)}), not in {place.namespace}."))
    return _ProjectOwner(owner)


def _check_literal_destination(directory: TenantDirectory, tenant: str | None, field: str,
                               value: str, kind: str) -> Decision:
    """A literal destination server/name against the tenant (None: a non-tenant project)."""
    owners = directory.tenants_of_server(value) if kind == "server" else directory.tenants_of_name(value)
    if tenant is not None:
        if owners == {tenant}:
            return ALLOWED
        if owners:
            return _deny("CrossTenantDestination",
                         f"{field} {value!r} is a cluster of tenant {', '.join(sorted(owners))}, not of "
                         f"tenant {tenant}. {_allowed_instead(directory, tenant)}")
        return _deny("UnregisteredDestination",
                     f"{field} {value!r} is not a registered cluster of tenant {tenant}. "
                     f"{_allowed_instead(directory, tenant)}")
    if owners:
        return _deny("TenantClusterFromForeignProject",
                     f"{field} {value!r} is a cluster of tenant {', '.join(sorted(owners))}; only its "
                     f"project(s) {_owner_projects(directory, owners)} may deploy there. Use one of those "
                     f"projects, or a destination that is not a tenant cluster.")
    return ALLOWED


def _project_change(directory: TenantDirectory, old_project: str, new_project: str, where: str) -> Decision:
    """Refuses moving an object between tenants (or into/out of a tenant) by editing its project."""
    if old_project == new_project:
        return ALLOWED

    def owners(project: str) -> frozenset[str]:
        if _is_templated(project):
            return frozenset({"<templated>"})
        owner = directory.tenant_of_project(project)
        return frozenset({owner} if owner else ())

    before, after = owners(old_project), owners(new_project)
    if before == after or not (before | after):
        return ALLOWED
    return _deny("ProjectChangeAcrossTenants",
                 f"{where} may not change from {old_project!r} to {new_project!r}: that moves it between "
                 f"tenants. Keep {old_project!r}, or delete it and create a new one in the project you need.")


# ---- Application --------------------------------------------------------------------------------

# The API server decodes these itself (exact keys; metadata.managedFields holds field paths as keys).
_SERVER_DECODED = ("metadata", "status")


def _canonical_or_denial(obj: Mapping | None) -> tuple[Any, Decision | None]:
    """The object with the keys Argo CD decodes read as Argo CD reads them, or a denial."""
    if obj is None:
        return None, None
    try:
        out = canonical({k: v for k, v in obj.items() if k not in _SERVER_DECODED})
    except AmbiguousKeys as e:
        return None, _deny("AmbiguousKeys", str(e))
    out.update({k: obj[k] for k in _SERVER_DECODED if k in obj})
    return out, None


def _read_request(obj: Mapping, old: Mapping | None, directory: TenantDirectory,
                  kind: str) -> tuple[Any, Any, _Place | None, Decision | None]:
    """The object and its stored version as Argo CD reads them, and whose request it is."""
    obj, denial = _canonical_or_denial(obj)
    old, old_denial = _canonical_or_denial(old)
    if denial or old_denial:
        return obj, old, None, denial or old_denial
    place = _place(directory, obj, kind)
    return obj, old, place, place.denial


def review_application(app: Mapping, directory: TenantDirectory, old: Mapping | None = None) -> Decision:
    """Whether a (non-admin) request may store this Application."""
    app, old, place, denial = _read_request(app, old, directory, "Application")
    if denial:
        return denial
    spec = _spec(app)
    project = _text(spec.get("project")) or "default"
    if old is not None:
        decision = _project_change(directory, _text(_spec(old).get("project")) or "default", project,
                                   "spec.project")
        if not decision.allowed:
            return decision
    owner = _project_owner(directory, place, project, "spec.project", "Application")
    if owner.denial:
        return owner.denial
    tenant = owner.tenant
    destination = spec.get("destination") if isinstance(spec.get("destination"), Mapping) else {}
    server, name = _text(destination.get("server")), _text(destination.get("name"))
    if tenant is not None and not server and not name:
        return _deny("NoDestination",
                     f"spec.destination is empty and tenant {tenant} has no single cluster to default to. "
                     f"{_allowed_instead(directory, tenant)} (Or label the Application with the "
                     f"environment of exactly one of them.)")
    for field, value, kind in (("spec.destination.server", server, "server"),
                               ("spec.destination.name", name, "name")):
        if value:
            decision = _check_literal_destination(directory, tenant, field, value, kind)
            if not decision.allowed:
                return decision
    return ALLOWED


def default_destination_patch(app: Mapping, directory: TenantDirectory,
                              environment_label: str = DEFAULT_ENVIRONMENT_LABEL) -> list[dict]:
    """JSON patch giving a destination-less tenant Application its tenant's only cluster.

    The candidates are the tenant's clusters, narrowed to the Application's own
    `<environment_label>` label when it has one. Exactly one candidate: it becomes
    spec.destination.server. Otherwise no patch; the validator then says what to choose.
    """
    canonical_app, denial = _canonical_or_denial(app)
    if denial or canonical_app != app:
        return []  # keys Argo CD reads differently: let the validator explain, add nothing
    spec = _spec(app)
    if not spec:
        return []
    destination = spec.get("destination")
    if isinstance(destination, Mapping) and (_text(destination.get("server")) or _text(destination.get("name"))):
        return []
    place = _place(directory, app, "Application")
    tenant = directory.tenant_of_project(_text(spec.get("project")) or "default")
    if place.denial or tenant is None or tenant != place.tenant:
        return []
    clusters = directory.clusters_of(tenant)
    labels = ((app.get("metadata") or {}).get("labels")) or {}
    environment = labels.get(environment_label)
    if environment is not None:
        clusters = tuple(c for c in clusters if c.labels.get(environment_label) == environment)
    servers = sorted({c.server for c in clusters})
    if len(servers) != 1:
        return []
    if isinstance(destination, Mapping):
        return [{"op": "add", "path": "/spec/destination/server", "value": servers[0]}]
    return [{"op": "add", "path": "/spec/destination", "value": {"server": servers[0]}}]


# ---- ApplicationSet -----------------------------------------------------------------------------

def _walk_generators(generators: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """Every generator in the tree as (path, kind, body), matrix/merge children included."""
    if not isinstance(generators, list):
        return
    for index, generator in enumerate(generators):
        if not isinstance(generator, Mapping):
            yield f"{path}[{index}]", "<invalid>", generator
            continue
        for kind, body in generator.items():
            if kind == "selector":  # a post-filter on generated parameters: cannot add any
                continue
            where = f"{path}[{index}].{kind}"
            yield where, kind, body
            if kind in ("matrix", "merge") and isinstance(body, Mapping):
                yield from _walk_generators(body.get("generators"), f"{where}.generators")


def _templates(appset: Mapping) -> tuple[list[tuple[str, Mapping]], Decision | None]:
    """All templates that shape the generated Applications: spec.template, every generator's
    own template override, and a literal templatePatch (keys read as Argo CD reads them)."""
    spec = _spec(appset)
    template = spec.get("template") if isinstance(spec.get("template"), Mapping) else {}
    found: list[tuple[str, Mapping]] = [("spec.template", template)]
    for where, _, body in _walk_generators(spec.get("generators"), "spec.generators"):
        if isinstance(body, Mapping) and isinstance(body.get("template"), Mapping):
            found.append((f"{where}.template", body["template"]))
    patch = spec.get("templatePatch")
    if patch:
        if not isinstance(patch, str) or _is_templated(patch):
            return found, _deny(
                "TemplatedTemplatePatch",
                "spec.templatePatch with template expressions can rewrite spec.project or spec.destination "
                "of each generated Application after review. Put those settings in spec.template, or ask a "
                "platform admin to create this ApplicationSet.")
        try:
            parsed = canonical(load_strict(patch), "spec.templatePatch")
        except (DuplicateKey, AmbiguousKeys) as e:
            return found, _deny("AmbiguousKeys", f"spec.templatePatch: {e}")
        except yaml.YAMLError:
            return found, _deny("InvalidTemplatePatch", "spec.templatePatch is not valid YAML or JSON.")
        if parsed is not None and not isinstance(parsed, Mapping):
            return found, _deny("InvalidTemplatePatch",
                                "spec.templatePatch must be an object patching the generated Application.")
        if parsed:
            found.append(("spec.templatePatch", parsed))
    return found, None


def _template_namespaces(appset: Mapping, templates: list[tuple[str, Mapping]]) -> Decision:
    """Generated Applications stay in the ApplicationSet's namespace (and so in its tenant)."""
    own = _text((appset.get("metadata") or {}).get("namespace"))
    for where, template in templates:
        metadata = template.get("metadata") if isinstance(template.get("metadata"), Mapping) else {}
        value = metadata.get("namespace")
        if value in (None, "", own):
            continue
        return _deny("TemplateNamespace",
                     f"{where}.metadata.namespace is {value!r}; generated Applications must stay in the "
                     f"ApplicationSet's own namespace {own}. Remove it.")
    return ALLOWED


def _template_projects(templates: list[tuple[str, Mapping]]) -> list[tuple[str, str]]:
    projects = []
    for where, template in templates:
        value = _spec(template).get("project")
        if value is not None and (not isinstance(value, str) or value != ""):
            projects.append((f"{where}.spec.project", value if isinstance(value, str) else repr(value)))
    return projects


def _main_project(appset: Mapping) -> str:
    template = _spec(appset).get("template")
    return _text(_spec(template if isinstance(template, Mapping) else {}).get("project"))


def _selector_pins_tenant(selector: Any, tenant: str) -> bool:
    if not isinstance(selector, Mapping):
        return False
    if (selector.get("matchLabels") or {}).get(LABEL_TENANT) == tenant:
        return True
    for expression in selector.get("matchExpressions") or ():
        if (isinstance(expression, Mapping) and expression.get("key") == LABEL_TENANT
                and expression.get("operator") == "In"
                and list(expression.get("values") or ()) and set(expression.get("values")) == {tenant}):
            return True
    return False


def _selector_excludes_tenants(selector: Any) -> bool:
    if not isinstance(selector, Mapping):
        return False
    return any(isinstance(e, Mapping) and e.get("key") == LABEL_TENANT and e.get("operator") == "DoesNotExist"
               and not (selector.get("matchLabels") or {}).get(LABEL_TENANT)
               for e in selector.get("matchExpressions") or ())


def _check_generator(directory: TenantDirectory, tenant: str | None, where: str, kind: str, body: Any,
                     parameters: set[str]) -> Decision:
    """One generator against the tenant; `parameters` are the ones a templated destination uses."""
    if kind == "clusters":
        selector = body.get("selector") if isinstance(body, Mapping) else None
        if tenant is not None:
            if _selector_pins_tenant(selector, tenant):
                return ALLOWED
            return _deny("ClusterGeneratorNotPinned",
                         f"{where}.selector must select only tenant {tenant}'s clusters: add "
                         f"matchLabels {{{LABEL_TENANT}: {tenant}}} (other labels may narrow it further).")
        if _selector_excludes_tenants(selector):
            return ALLOWED
        return _deny("ClusterGeneratorReachesTenants",
                     f"{where}.selector may select tenant clusters, which only their tenants' projects may "
                     f"deploy to. Add matchExpressions [{{key: {LABEL_TENANT}, operator: DoesNotExist}}], "
                     f"or use a tenant's project and pin {LABEL_TENANT}.")
    if kind in ("matrix", "merge"):
        return ALLOWED  # their children are walked separately
    if not parameters:
        return ALLOWED  # the destination is literal: parameters from here cannot change it
    if kind == "list" and isinstance(body, Mapping):
        if body.get("elementsYaml"):
            return _deny("UncheckableGenerator",
                         f"{where}.elementsYaml is computed at generation time and feeds the templated "
                         f"destination; list the elements literally in {where}.elements instead.")
        for index, element in enumerate(body.get("elements") or ()):
            if not isinstance(element, Mapping):
                continue
            for parameter in parameters & set(element):
                value = element[parameter]
                kind_of = "server" if parameter == "server" else "name"
                if not isinstance(value, str) or _is_templated(value):
                    return _deny("UncheckableGenerator",
                                 f"{where}.elements[{index}].{parameter} must be a literal cluster "
                                 f"{kind_of}, because it becomes the destination.")
                decision = _check_literal_destination(directory, tenant, f"{where}.elements[{index}].{parameter}",
                                                      value, kind_of)
                if not decision.allowed:
                    return decision
        return ALLOWED
    if kind == "git" and isinstance(body, Mapping) and not body.get("files"):
        return ALLOWED  # a git directories generator yields only path.* and values.* parameters
    return _deny("UncheckableGenerator",
                 f"{where} ({kind} generator) can supply the destination's "
                 f"{'/'.join(sorted(parameters))} parameter, which cannot be checked before generation. "
                 f"Use a literal destination, a clusters generator pinned to {LABEL_TENANT}, or list "
                 f"elements naming your clusters.")


def review_application_set(appset: Mapping, directory: TenantDirectory, old: Mapping | None = None) -> Decision:
    """Whether a (non-admin) request may store this ApplicationSet."""
    appset, old, place, denial = _read_request(appset, old, directory, "ApplicationSet")
    if denial:
        return denial
    templates, denial = _templates(appset)
    if denial:
        return denial
    decision = _template_namespaces(appset, templates)
    if not decision.allowed:
        return decision
    projects = _template_projects(templates)
    if not _main_project(appset):
        return _deny("NoProject",
                     "spec.template.spec.project must name your tenant's Argo CD project literally, "
                     "e.g. project: tenant-a.")
    for where, project in projects:
        if _is_templated(project):
            return _deny("TemplatedProject",
                         f"{where} is templated ({project!r}) and could resolve to another tenant's project. "
                         f"Write the project name literally.")
    if old is not None:
        decision = _project_change(directory, _main_project(old), _main_project(appset),
                                   "spec.template.spec.project")
        if not decision.allowed:
            return decision
    owners = set()
    for where, project in projects:
        owner = _project_owner(directory, place, project, where, "ApplicationSet")
        if owner.denial:
            return owner.denial
        owners.add(owner.tenant)
    if len(owners) > 1:
        named = ", ".join(f"{w}={p!r}" for w, p in projects)
        return _deny("MixedProjects",
                     f"the templates name projects of different tenants ({named}); every generated "
                     f"Application must belong to the same tenant.")
    tenant = next(iter(owners))

    parameters: set[str] = set()
    for where, template in templates:
        destination = _spec(template).get("destination")
        if not isinstance(destination, Mapping):
            continue
        for kind in ("server", "name"):
            value = destination.get(kind)
            if value is None or value == "":
                continue
            field = f"{where}.spec.destination.{kind}"
            if not isinstance(value, str):
                return _deny("InvalidDestination", f"{field} must be a string.")
            if _is_templated(value):
                match = _DESTINATION_PARAMETER.match(value.strip())
                if not match:
                    return _deny("TemplatedDestination",
                                 f"{field} is {value!r}; a templated destination may only be the selected "
                                 f"cluster's own parameter, '{{{{{kind}}}}}' (or '{{{{ .{kind} }}}}' with "
                                 f"goTemplate), fed by a clusters generator pinned to {LABEL_TENANT}.")
                parameters.add(match.group(1))
                continue
            decision = _check_literal_destination(directory, tenant, field, value.strip(), kind)
            if not decision.allowed:
                return decision

    for where, kind, body in _walk_generators(_spec(appset).get("generators"), "spec.generators"):
        decision = _check_generator(directory, tenant, where, kind, body, parameters)
        if not decision.allowed:
            return decision
    return ALLOWED
