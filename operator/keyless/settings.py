"""Installation-wide operator settings: one object, built once from the flags `keyless operator` and
`keyless render` share, so that what `keyless render` prints is what the operator applies.

Every default lives here, once: the dataclass fields and the flags read the same constants.
Imports nothing of Keyless but model.names (render/ and reconcile/ import this, never the other way round).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .model.names import DEFAULT_CALLER_TOKEN_FILE

DEFAULT_BROKER_NAMESPACE = "keyless-system"
# The broker's in-cluster Service as the chart installs it; tenant clusters must reach the issuer URL.
DEFAULT_BROKER_ISSUER = "https://keyless-broker.keyless-system.svc"
# The TremoloSecurity fork of kube-oidc-proxy, as upstream publishes it (the chart's operator.proxyImage).
DEFAULT_PROXY_IMAGE = "quay.io/tremolosecurity/kube-oidc-proxy:1.0.11"
DEFAULT_ARGOCD_NAMESPACE = "argocd"
DEFAULT_SIGNING_ALGORITHM = "ES256"
SIGNING_ALGORITHMS = ("ES256", "RS256")
# Paths inside the Argo CD pods (argocd-values.yaml mounts them there).
DEFAULT_CREDENTIAL_DIR = "/var/run/keyless/credentials"
DEFAULT_EXEC_BROKER_CA_FILE = "/var/run/keyless/broker-ca/ca.crt"
EXEC_API_VERSION = "client.authentication.k8s.io/v1"
EXEC_MODES = ("agent", "token")


@dataclass(frozen=True)
class ExecSettings:
    """How Argo CD obtains a token: read the agent's file (default) or run `keyless token`."""

    mode: str = "agent"  # agent | token
    credential_dir: str = DEFAULT_CREDENTIAL_DIR
    broker_url: str = DEFAULT_BROKER_ISSUER  # as seen from the Argo CD pods (token mode)
    broker_ca_file: str = DEFAULT_EXEC_BROKER_CA_FILE
    token_file: str = DEFAULT_CALLER_TOKEN_FILE
    keyless_command: str = "keyless"
    api_version: str = EXEC_API_VERSION


@dataclass(frozen=True)
class OperatorSettings:
    argocd_namespaces: tuple[str, ...] = (DEFAULT_ARGOCD_NAMESPACE,)
    broker_namespace: str = DEFAULT_BROKER_NAMESPACE
    # Where the per-cluster proxy CAs live. Keep it apart from the broker's namespace in production:
    # RBAC cannot exclude one name, so write access there would also let the operator read the
    # broker's signing keys.
    pki_namespace: str = DEFAULT_BROKER_NAMESPACE
    broker_issuer: str = DEFAULT_BROKER_ISSUER
    broker_url: str | None = None  # where the operator itself mints verification tokens
    broker_ca_file: str | None = None
    broker_token_file: str | None = None  # the operator's own Pod-bound token for the broker
    exec: ExecSettings = field(default_factory=ExecSettings)
    resync_seconds: float = 60.0
    retry_seconds: float = 5.0  # first delay after a transient failure; doubles per failure
    max_retry_seconds: float = 300.0
    # After a permanent failure (the API refused the request: 400, 403, 422, ...) nothing is retried
    # until the manifest changes, or this long has passed (RBAC or a policy may be fixed meanwhile).
    permanent_retry_seconds: float = 600.0
    proxy_image: str = DEFAULT_PROXY_IMAGE
    tenant_api_timeout_seconds: float = 10.0
    deletion_give_up_seconds: float = 120.0
    verify_seconds: float = 300.0  # how often a verified chain is proven again
    # Taking over an Argo CD cluster Secret marked keyless.dev/adopt-by waits this long after the chain was
    # first verified: the agents learn a new target on their 15 s poll and must have written its file.
    adopt_grace_seconds: float = 30.0
    signing_algorithm: str = DEFAULT_SIGNING_ALGORITHM
    # SIG Multicluster ClusterProfiles: maintain one per RemoteTenantCluster (spec.clusterProfile opts out),
    # in this namespace ("" = each manifest's own namespace).
    cluster_profiles: bool = False
    cluster_profile_namespace: str = ""

    @property
    def verification_enabled(self) -> bool:
        return bool(self.broker_url and self.broker_token_file)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every flag that becomes an OperatorSettings field (`keyless operator` and `keyless render`)."""
    p.add_argument("--argocd-namespace", action="append", default=[],
                   help=f"an Argo CD namespace the operator may write cluster Secrets to (repeatable; default "
                        f"{DEFAULT_ARGOCD_NAMESPACE})")
    p.add_argument("--broker-namespace", default=DEFAULT_BROKER_NAMESPACE, help="where BrokerTargets go (default %(default)s)")
    p.add_argument("--pki-namespace", default="",
                   help="where the per-cluster proxy CA Secrets go (default: the broker namespace; use a "
                        "separate one so the operator needs no Secret rights next to the broker's signing keys)")
    p.add_argument("--broker-issuer", default=DEFAULT_BROKER_ISSUER,
                   help="the broker's OIDC issuer URL, which tenant clusters trust (default %(default)s)")
    p.add_argument("--broker-url", help="URL the operator uses to mint verification tokens (default: the issuer)")
    p.add_argument("--broker-ca-file", help="CA bundle of the broker's serving certificate, which the tenant side "
                                            "trusts (read once at start-up; default: none)")
    p.add_argument("--broker-token-file", help="the operator's own Pod-bound token for the broker (default: none, "
                                               "so no verification tokens are minted)")
    p.add_argument("--exec-mode", choices=EXEC_MODES, default="agent",
                   help="Argo CD's exec command: read the agent's file (default) or run `keyless token`")
    p.add_argument("--credential-dir", default=DEFAULT_CREDENTIAL_DIR,
                   help="where the agent keeps ExecCredential files in the Argo CD pods")
    p.add_argument("--exec-broker-url", help="broker URL as seen from the Argo CD pods (token mode; default: "
                                             "--broker-url, then the issuer)")
    p.add_argument("--exec-broker-ca-file", default=DEFAULT_EXEC_BROKER_CA_FILE,
                   help="broker CA path inside the Argo CD pods (token mode)")
    p.add_argument("--exec-token-file", default=DEFAULT_CALLER_TOKEN_FILE,
                   help="projected token path inside the Argo CD pods (token mode)")
    p.add_argument("--exec-command", default="keyless", help="path of keyless inside the Argo CD pods (token mode)")
    p.add_argument("--resync-seconds", type=float, default=60.0, help="drift-repair interval (default %(default)s)")
    p.add_argument("--retry-seconds", type=float, default=5.0,
                   help="first delay after a transient failure; doubles per failure, with jitter (default %(default)s)")
    p.add_argument("--max-retry-seconds", type=float, default=300.0,
                   help="longest delay between retries of a transient failure (default %(default)s)")
    p.add_argument("--permanent-retry-seconds", type=float, default=600.0,
                   help="after the API refused a request (400, 403, 422, ...), try again only when the manifest "
                        "changes or after this long (default %(default)s)")
    p.add_argument("--deletion-give-up-seconds", type=float, default=120.0,
                   help="stop trying to clean an unreachable tenant after this long, with an Event (default %(default)s)")
    p.add_argument("--tenant-api-timeout-seconds", type=float, default=10.0,
                   help="timeout of each call to a tenant API (default %(default)s)")
    p.add_argument("--verify-seconds", type=float, default=300.0,
                   help="how often a verified chain is proven again with a real token (default %(default)s)")
    p.add_argument("--adopt-grace-seconds", type=float, default=30.0,
                   help="how long after the chain was first verified Keyless takes over an Argo CD cluster Secret "
                        "marked keyless.dev/adopt-by (the agents' credential files must exist first; default "
                        "%(default)s)")
    p.add_argument("--signing-algorithm", choices=SIGNING_ALGORITHMS, default=DEFAULT_SIGNING_ALGORITHM,
                   help="the broker's signing algorithm, for the tenant side's trust configuration")
    p.add_argument("--proxy-image", default=DEFAULT_PROXY_IMAGE,
                   help="kube-oidc-proxy image for Managed mode (default %(default)s)")
    p.add_argument("--cluster-profiles", action="store_true",
                   help="maintain a SIG Multicluster ClusterProfile (multicluster.x-k8s.io/v1alpha1) per "
                        "RemoteTenantCluster, with Keyless as its access provider (spec.clusterProfile opts out)")
    p.add_argument("--cluster-profile-namespace", default="",
                   help="where the ClusterProfiles go (default: each manifest's own namespace); a manifest may "
                        "also name one of its tenant's namespaces in spec.clusterProfile.namespace")


def from_args(args: argparse.Namespace) -> OperatorSettings:
    """The one OperatorSettings of a process, from the flags of `add_arguments`."""
    issuer = args.broker_issuer.rstrip("/")
    broker_url = (args.broker_url or issuer).rstrip("/")
    return OperatorSettings(
        argocd_namespaces=tuple(args.argocd_namespace or [DEFAULT_ARGOCD_NAMESPACE]),
        broker_namespace=args.broker_namespace,
        pki_namespace=args.pki_namespace or args.broker_namespace,
        broker_issuer=issuer,
        broker_url=broker_url,
        broker_ca_file=args.broker_ca_file,
        broker_token_file=args.broker_token_file,
        exec=ExecSettings(mode=args.exec_mode, credential_dir=args.credential_dir,
                          # verbatim: any change of the exec config makes Argo CD drop its cache
                          broker_url=args.exec_broker_url or args.broker_url or args.broker_issuer,
                          broker_ca_file=args.exec_broker_ca_file, token_file=args.exec_token_file,
                          keyless_command=args.exec_command),
        resync_seconds=args.resync_seconds,
        retry_seconds=args.retry_seconds,
        max_retry_seconds=max(args.max_retry_seconds, args.retry_seconds),
        permanent_retry_seconds=args.permanent_retry_seconds,
        proxy_image=args.proxy_image,
        verify_seconds=args.verify_seconds,
        adopt_grace_seconds=args.adopt_grace_seconds,
        deletion_give_up_seconds=args.deletion_give_up_seconds,
        tenant_api_timeout_seconds=args.tenant_api_timeout_seconds,
        signing_algorithm=args.signing_algorithm,
        cluster_profiles=args.cluster_profiles,
        cluster_profile_namespace=args.cluster_profile_namespace,
    )
