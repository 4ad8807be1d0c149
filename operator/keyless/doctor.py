"""`keyless doctor NAMESPACE/NAME` (also `kubectl keyless doctor`): walks one cluster's chain from where it
runs and says, step by step, what works and what to do about what does not, like `cmctl status`.

The steps, in the order a token travels: the RemoteTenantCluster and its conditions; the Argo CD cluster
Secret; the BrokerTarget; the broker's discovery document and JWKS; a token minted for a caller (a given
token file, or a Pod-bound TokenRequest for one of the target's allowed callers); the tenant endpoint's TLS
against the CA Argo CD is given; a SelfSubjectReview with that token. Nothing it prints or returns ever
holds a token: messages are built from status codes, reasons and names only.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import ssl
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

PASS, FAIL, SKIP, WARN = "pass", "fail", "skip", "warn"
BROKER_CA_CONFIGMAP = "keyless-broker-ca"  # the chart publishes the broker CA here, in each Argo CD namespace

# What to do, by condition reason (the README's troubleshooting table, in short).
FIXES = {
    "Conflict": "another manifest or a foreign Secret holds this cluster name or server: use another "
                "spec.argocd.clusterName, or remove the other Secret",
    "NamespaceNotOwned": "an admin labels the namespace keyless.dev/tenant=<spec.tenant>, or move the manifest",
    "ArgoNamespaceNotAllowed": "start the operator with --argocd-namespace for spec.argocd.namespace",
    "InvalidSpec": "fix the field the message names",
    "BootstrapCredentialMissing": "create the bootstrap kubeconfig Secret (spec.bootstrap.kubeconfigSecretRef)",
    "BootstrapCredentialInvalid": "put a usable kubeconfig (inline credentials, https) in the bootstrap Secret",
    "TenantAccessDenied": "the bootstrap credential (or access.clusterRole after deleteAfterInstall) needs "
                          "rights to manage the proxy: give cluster-admin or a new bootstrap credential",
    "ProxyNotReady": "look at the kube-oidc-proxy Pods on the tenant",
    "BrokerCAUnknown": "start the operator with --broker-ca-file",
    "TenantUnreachable": "the tenant endpoint is down or unreachable from the operator; it recovers by itself",
    "CAMismatch": "spec.server's certificate is not signed by spec.caData (or the operator's proxy CA)",
    "TokenRejected": "the tenant side does not trust the broker's issuer for this audience: check the proxy's "
                     "--oidc-issuer-url/--oidc-client-id or the AuthenticationConfiguration",
    "WrongIdentity": "the tenant maps the token to another user: username claim must be sub, no prefix",
    "BrokerRefused": "the operator's identity is not allowed or the BrokerTarget is missing",
    "BrokerUnavailable": "the broker is down or unreachable from the operator",
    "VerificationDisabled": "run the operator with --broker-url and --broker-token-file",
    "ClusterProfileAPIMissing": "install the ClusterProfile CRD or run the operator without --cluster-profiles",
    "NamespaceNotAllowed": "spec.clusterProfile.namespace must be a namespace of the same tenant",
}


@dataclass
class Step:
    name: str
    status: str
    message: str
    fix: str = ""


@dataclass
class Report:
    cluster: str
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status != FAIL for s in self.steps)

    def add(self, name: str, status: str, message: str, fix: str = "") -> Step:
        step = Step(name, status, message, fix)
        self.steps.append(step)
        return step


@dataclass
class Minted:
    token: str
    caller: str
    expires_in: float

    def __repr__(self) -> str:  # never show the token
        return f"Minted(caller={self.caller!r}, expires_in={self.expires_in})"


def _redact(text: str) -> str:
    from .brokerclient.reply import redact

    return redact(str(text))[:300]


def _unverified_subject(token: str) -> str | None:
    """Who a ServiceAccount token says it is (not verified: only to name the caller in the report)."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))).get("sub")
    except (IndexError, ValueError, AttributeError):
        return None


class Doctor:
    def __init__(self, args: argparse.Namespace):
        from .kube import Kube, KubeConfig

        self.args = args
        self.kube = Kube(KubeConfig.default(args.kubeconfig), user_agent="keyless-doctor", timeout=args.timeout)
        self.timeout = args.timeout
        namespace, _, name = args.cluster.partition("/")
        self.namespace, self.name = namespace, name
        self.report = Report(args.cluster)
        self._private = tempfile.TemporaryDirectory(prefix="keyless-doctor-")

    async def close(self) -> None:
        await self.kube.close()
        self._private.cleanup()

    # ---- the walk -------------------------------------------------------------------------------
    async def run(self) -> Report:
        rtc = await self.manifest()
        if rtc is None:
            return self.report
        status = rtc.get("status") or {}
        spec = rtc.get("spec") or {}
        secret = await self.argocd_secret(status, spec)
        target = await self.broker_target(status, spec)
        broker_ca = await self.broker_ca(spec)
        broker_ok = await self.broker(status, broker_ca)
        if (spec.get("broker") or {}).get("kind") == "OpenUnison":
            minted = self._skip_token("tokens come from OpenUnison (spec.broker.kind); its API is not the broker's")
        elif broker_ok:
            minted = await self.token(status, target, broker_ca)
        else:
            minted = self._skip_token("the broker is unreachable")
        ca_pem = self._ca_pem(secret, spec)
        tls_ok = await self.tenant_tls(spec, ca_pem)
        await self.identity(spec, status, ca_pem, minted, tls_ok)
        return self.report

    async def manifest(self) -> dict | None:
        from .kube.client import resource_path
        from .model import names

        step = "manifest"
        try:
            rtc = await self.kube.get(resource_path(names.API_VERSION, "RemoteTenantCluster", self.namespace, self.name))
        except Exception as e:  # noqa: BLE001 - any failure to read is the first thing to fix
            self.report.add(step, FAIL, f"cannot read RemoteTenantCluster {self.args.cluster}: {_redact(e)}",
                            "check --kubeconfig (the control plane) and that you may get remotetenantclusters")
            return None
        if rtc is None:
            self.report.add(step, FAIL, f"RemoteTenantCluster {self.args.cluster} does not exist",
                            "kubectl get rtc -A lists the clusters")
            return None
        conditions = {c["type"]: c for c in (rtc.get("status") or {}).get("conditions", [])}
        ready = conditions.get("Ready")
        if ready is None:
            self.report.add(step, WARN, "no conditions yet: the operator has not reconciled it",
                            "check that the operator runs and watches this namespace")
        elif ready["status"] == "True":
            self.report.add(step, PASS, f"Ready=True ({ready.get('reason')})")
        else:
            failing = [c for c in conditions.values() if c["type"] != "Ready" and c["status"] != "True"]
            first = failing[0] if failing else ready
            self.report.add(step, FAIL, f"Ready={ready['status']}: {first['type']}={first['status']} "
                                        f"({first.get('reason')}): {_redact(first.get('message', ''))}",
                            FIXES.get(first.get("reason", ""), "kubectl describe rtc shows every condition"))
        return rtc

    async def argocd_secret(self, status: dict, spec: dict) -> dict | None:
        from .kube.client import resource_path
        from .render.argocd_client import cluster_secret_fields

        step = "argocd-secret"
        where = status.get("argocdSecret")
        if not where:
            self.report.add(step, FAIL, "the operator has not registered the cluster in Argo CD",
                            "see the manifest's ArgoClusterRegistered condition")
            return None
        namespace, _, name = where.partition("/")
        secret = await self.kube.get(resource_path("v1", "Secret", namespace, name))
        if secret is None:
            self.report.add(step, FAIL, f"Secret {where} does not exist", "the operator recreates it at its next resync")
            return None
        fields = cluster_secret_fields(secret)
        labels = secret["metadata"].get("labels") or {}
        config = json.loads(fields.get("config") or "{}")
        problems = []
        if labels.get("argocd.argoproj.io/secret-type") != "cluster":
            problems.append("label argocd.argoproj.io/secret-type=cluster is missing")
        if fields.get("server") != spec.get("server", "").rstrip("/"):
            problems.append("its server is not spec.server")
        stored = [k for k in ("bearerToken", "password", "username") if config.get(k)]
        stored += [k for k in ("keyData", "certData") if (config.get("tlsClientConfig") or {}).get(k)]
        if stored:
            problems.append(f"it stores a credential ({', '.join(stored)})")
        exec_config = config.get("execProviderConfig") or {}
        if not exec_config.get("command"):
            problems.append("it has no execProviderConfig")
        if problems:
            self.report.add(step, FAIL, f"Secret {where}: {'; '.join(problems)}",
                            "the operator repairs drift at its next resync; a Secret it did not write, remove")
        else:
            command = " ".join([exec_config["command"], *exec_config.get("args", [])[:1]])
            self.report.add(step, PASS, f"{where}: server {fields['server']}, exec `{command}`, no stored credential")
        return secret

    async def broker_target(self, status: dict, spec: dict) -> dict | None:
        from .kube.client import resource_path
        from .model import names

        step = "broker-target"
        if (spec.get("broker") or {}).get("kind") == "OpenUnison":
            self.report.add(step, SKIP, "tokens come from OpenUnison (spec.broker.kind)")
            return None
        target_name = status.get("targetName") or names.target_name(self.namespace, self.name)
        namespace = self.args.broker_namespace
        target = await self.kube.get(resource_path(names.API_VERSION, "BrokerTarget", namespace, target_name))
        if target is None:
            self.report.add(step, FAIL, f"BrokerTarget {namespace}/{target_name} does not exist",
                            "see the BrokerTargetRegistered condition; --broker-namespace if the broker runs elsewhere")
            return None
        target_spec = target.get("spec") or {}
        if status.get("audience") and target_spec.get("audience") != status["audience"]:
            self.report.add(step, FAIL, f"its audience is not the cluster's ({status['audience']})",
                            "the operator repairs it at its next resync")
        else:
            self.report.add(step, PASS, f"{namespace}/{target_name}: audience {target_spec.get('audience')}, "
                                        f"callers {', '.join(target_spec.get('allowedCallers', [])) or 'none'}")
        return target

    async def broker_ca(self, spec: dict) -> bytes | None:
        from .kube.client import resource_path

        if self.args.broker_ca_file:
            return Path(self.args.broker_ca_file).read_bytes()
        argocd_namespace = (spec.get("argocd") or {}).get("namespace") or "argocd"
        try:
            config_map = await self.kube.get(resource_path("v1", "ConfigMap", argocd_namespace, BROKER_CA_CONFIGMAP))
        except Exception:  # noqa: BLE001 - then the system trust store
            return None
        pem = ((config_map or {}).get("data") or {}).get("ca.crt")
        return pem.encode() if pem else None

    def _broker_url(self, status: dict) -> str:
        return (self.args.broker_url or status.get("issuer") or "").rstrip("/")

    async def broker(self, status: dict, broker_ca: bytes | None) -> bool:
        import aiohttp

        step = "broker"
        url, issuer = self._broker_url(status), status.get("issuer", "")
        if not url:
            self.report.add(step, FAIL, "no broker URL (status.issuer is empty)", "pass --broker-url")
            return False
        context = ssl.create_default_context(cadata=broker_ca.decode()) if broker_ca else ssl.create_default_context()
        path = urlsplit(issuer).path.rstrip("/")
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(f"{url}{path}/.well-known/openid-configuration", ssl=context) as r:
                    if r.status != 200:
                        raise _StepFailed(f"discovery answered HTTP {r.status}")
                    discovery = await r.json(content_type=None)
                async with session.get(f"{url}{path}/openid/v1/jwks", ssl=context) as r:
                    if r.status != 200:
                        raise _StepFailed(f"JWKS answered HTTP {r.status}")
                    keys = (await r.json(content_type=None)).get("keys") or []
        except _StepFailed as e:
            self.report.add(step, FAIL, f"{url}: {e}", "check the broker's log and readiness (/readyz)")
            return False
        except aiohttp.ClientConnectorCertificateError:
            self.report.add(step, FAIL, f"{url}: its certificate is not trusted",
                            f"pass --broker-ca-file, or publish the CA in ConfigMap {BROKER_CA_CONFIGMAP} (chart: "
                            f"broker.tls.caCert)")
            return False
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.report.add(step, FAIL, f"cannot reach the broker at {url} ({e.__class__.__name__})",
                            "is the broker running? kubectl -n keyless-system get pods; from here, pass --broker-url "
                            "if the issuer URL is not reachable")
            return False
        if discovery.get("issuer") != issuer:
            self.report.add(step, FAIL, f"the broker's issuer is {discovery.get('issuer')!r}, the cluster's {issuer!r}",
                            "the operator's --broker-issuer must equal the broker's --issuer")
            return False
        if not keys:
            self.report.add(step, FAIL, "the JWKS has no key", "the broker has not loaded or written its keys yet")
            return False
        algorithms = sorted({k.get("alg", "?") for k in keys})
        self.report.add(step, PASS, f"discovery and JWKS at {url}: issuer matches, {len(keys)} key(s) "
                                    f"({', '.join(algorithms)})")
        return True

    def _skip_token(self, why: str) -> None:
        self.report.add("token", SKIP, f"no token minted: {why}")
        return None

    async def _caller_token(self, target: dict | None) -> tuple[str | None, str]:
        """(token, caller): --token-file, or a Pod-bound TokenRequest for --caller / the first allowed caller."""
        if self.args.token_file:
            token = Path(self.args.token_file).read_text().strip()
            return token, _unverified_subject(token) or f"the token in {self.args.token_file}"
        caller = self.args.caller
        if not caller:
            callers = ((target or {}).get("spec") or {}).get("allowedCallers") or []
            if not callers:
                return None, "no allowed caller"
            parts = callers[0].split(":")
            caller = f"{parts[2]}/{parts[3]}"
        namespace, _, account = caller.partition("/")
        from .kube.client import resource_path

        pods = await self.kube.list(resource_path("v1", "Pod", namespace))
        pod = next((p for p in pods.get("items", []) if (p.get("spec") or {}).get("serviceAccountName") == account
                    and not p["metadata"].get("deletionTimestamp")), None)
        username = f"system:serviceaccount:{namespace}:{account}"
        if pod is None:
            return None, f"{username} has no Pod to bind a token to"
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"audiences": [self.args.caller_audience], "expirationSeconds": 600,
                            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod["metadata"]["name"],
                                               "uid": pod["metadata"]["uid"]}}}
        answer = await self.kube.create(resource_path("v1", "ServiceAccount", namespace, account) + "/token", request)
        return answer["status"]["token"], username

    async def token(self, status: dict, target: dict | None, broker_ca: bytes | None) -> Minted | None:
        from .brokerclient.aio import BrokerClient
        from .brokerclient.reply import BrokerError, BrokerRefused

        step = "token"
        try:
            caller_token, caller = await self._caller_token(target)
        except Exception as e:  # noqa: BLE001 - the caller's token is optional: say why there is none
            return self._skip_token(f"cannot get a caller token ({_redact(e)}); pass --token-file or --caller")
        if caller_token is None:
            return self._skip_token(f"{caller}; pass --token-file or --caller NAMESPACE/SERVICEACCOUNT")
        private = Path(self._private.name)
        token_file, ca_file = private / "caller-token", private / "broker-ca.crt"
        token_file.touch(mode=0o600)
        token_file.write_text(caller_token)
        if broker_ca:
            ca_file.write_bytes(broker_ca)
        client = BrokerClient(self._broker_url(status), str(ca_file) if broker_ca else None, str(token_file),
                              timeout=self.timeout, user_agent="keyless-doctor")
        target_name = status.get("targetName") or f"{self.namespace}.{self.name}"
        try:
            minted = await client.mint(target_name)
        except BrokerRefused as e:
            fixes = {"caller_not_allowed": f"add {caller} to spec.access.allowedCallers",
                     "unknown_target": "the BrokerTarget is missing: see BrokerTargetRegistered",
                     "pod_gone": "the caller's Pod no longer exists: its token is refused",
                     "invalid_token": "the caller token is expired or not for audience keyless-broker"}
            self.report.add(step, FAIL, f"the broker refused {caller} (HTTP {e.status} {e.error})",
                            fixes.get(e.error, "see the broker's audit log for this caller"))
            return None
        except BrokerError as e:
            self.report.add(step, FAIL, f"no token for {caller}: {_redact(e)}", "check the broker")
            return None
        finally:
            await client.close()
            token_file.unlink(missing_ok=True)
        self.report.add(step, PASS, f"minted for {caller} (lives {int(minted.expires_in)} s)")
        return Minted(minted.token, caller, minted.expires_in)

    @staticmethod
    def _ca_pem(secret: dict | None, spec: dict) -> bytes | None:
        """The CA Argo CD is given (the Secret's caData), else spec.caData."""
        from .render.argocd_client import cluster_secret_fields

        if secret is not None:
            config = json.loads(cluster_secret_fields(secret).get("config") or "{}")
            data = (config.get("tlsClientConfig") or {}).get("caData")
            if data:
                return base64.b64decode(data)
        return base64.b64decode(spec["caData"]) if spec.get("caData") else None

    async def tenant_tls(self, spec: dict, ca_pem: bytes | None) -> bool:
        step = "tenant-tls"
        server = spec.get("server", "")
        parts = urlsplit(server)
        context = ssl.create_default_context(cadata=ca_pem.decode()) if ca_pem else ssl.create_default_context()
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, parts.port or 443, ssl=context), self.timeout)
            writer.close()
            await writer.wait_closed()
        except ssl.SSLCertVerificationError as e:
            self.report.add(step, FAIL, f"{server}: its certificate is not signed by the CA Argo CD is given "
                                        f"({e.verify_message})",
                            "spec.caData must be base64 of the PEM CA that signed the endpoint's certificate (or "
                            "give the endpoint a certificate from that CA)")
            return False
        except (OSError, TimeoutError) as e:
            self.report.add(step, FAIL, f"cannot reach {server} ({e.__class__.__name__})",
                            "is the tenant API server or proxy up, and reachable from here?")
            return False
        self.report.add(step, PASS, f"{server} presents a certificate signed by the CA Argo CD is given")
        return True

    async def identity(self, spec: dict, status: dict, ca_pem: bytes | None, minted: Minted | None,
                       tls_ok: bool) -> None:
        from .kube import Kube, KubeConfig, KubeError
        from .kube.client import API_ERRORS

        step = "identity"
        if minted is None or not tls_ok:
            self.report.add(step, SKIP, "needs a minted token and a trusted endpoint (see above)")
            return
        server = spec["server"].rstrip("/")
        expected = (spec.get("access") or {}).get("username") or f"keyless:{spec.get('tenant')}:argocd"
        tenant = Kube(KubeConfig(server=server, ca_pem=ca_pem, token=minted.token), user_agent="keyless-doctor",
                      timeout=self.timeout)
        try:
            async with tenant:
                username = await tenant.who_am_i()
        except KubeError as e:
            if e.status == 401:
                self.report.add(step, FAIL, f"{server} refused the broker's token (HTTP 401)",
                                f"the tenant side must trust issuer {status.get('issuer')} for audience "
                                f"{status.get('audience')}: kube-oidc-proxy --oidc-issuer-url/--oidc-client-id, or the "
                                f"API server's AuthenticationConfiguration (status.authenticationConfiguration)")
            else:
                self.report.add(step, FAIL, f"{server} answered HTTP {e.status} to a SelfSubjectReview",
                                "check the tenant endpoint's log")
            return
        except ValueError:
            self.report.add(step, FAIL, f"{server} gave an unreadable SelfSubjectReview", "is it a Kubernetes API?")
            return
        except API_ERRORS as e:
            self.report.add(step, FAIL, f"SelfSubjectReview on {server} failed ({e.__class__.__name__})",
                            "the endpoint accepted TLS but not the request; check its log")
            return
        if username != expected:
            self.report.add(step, FAIL, f"the tenant sees the token as {username!r}, not {expected!r}",
                            FIXES["WrongIdentity"])
            return
        self.report.add(step, PASS, f"SelfSubjectReview on {server}: {username}, as configured")


class _StepFailed(Exception):
    pass


SYMBOLS = {PASS: "PASS", FAIL: "FAIL", SKIP: "SKIP", WARN: "WARN"}


def render_text(report: Report) -> str:
    lines = [f"keyless doctor {report.cluster}"]
    width = max((len(s.name) for s in report.steps), default=8)
    for step in report.steps:
        lines.append(f"  [{SYMBOLS[step.status]}] {step.name:<{width}}  {step.message}")
        if step.fix and step.status in (FAIL, WARN):
            lines.append(f"  {'':6} {'':<{width}}  fix: {step.fix}")
    failed = [s.name for s in report.steps if s.status == FAIL]
    lines.append("OK: the chain works" if not failed else f"FAILED: {', '.join(failed)}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cluster", metavar="NAMESPACE/NAME", help="the RemoteTenantCluster to check")
    p.add_argument("--kubeconfig", help="kubeconfig of the control plane (default $KUBECONFIG, then in-cluster)")
    p.add_argument("--broker-url", help="where to reach the broker from here (default: the cluster's issuer)")
    p.add_argument("--broker-ca-file", help=f"the broker's CA (default: ConfigMap {BROKER_CA_CONFIGMAP} in the Argo "
                                            f"CD namespace, else the system's trust)")
    p.add_argument("--broker-namespace", default="keyless-system", help="where BrokerTargets live (default %(default)s)")
    p.add_argument("--token-file", help="a caller's projected token (audience keyless-broker) to mint with "
                                        "(default: none; see --caller)")
    p.add_argument("--caller", metavar="NAMESPACE/SERVICEACCOUNT",
                   help="mint as this ServiceAccount, with a TokenRequest bound to one of its Pods (default: the "
                        "target's first allowed caller)")
    p.add_argument("--caller-audience", default="keyless-broker", help="the broker's caller audience")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text", help="report format")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per network call (default %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if "/" not in args.cluster:
        print("keyless doctor: give the cluster as NAMESPACE/NAME", file=sys.stderr)
        return 2

    async def main() -> Report:
        doctor = Doctor(args)
        try:
            return await doctor.run()
        finally:
            await doctor.close()

    report = asyncio.run(main())
    if args.output == "json":
        print(json.dumps({"cluster": report.cluster, "ok": report.ok,
                          "steps": [asdict(s) for s in report.steps]}, indent=2))
    else:
        print(render_text(report))
    return 0 if report.ok else 1


def kubectl_plugin() -> int:
    """`kubectl keyless ...`: kubectl runs kubectl-keyless with the rest of the command line."""
    from .cli import main

    return main(sys.argv[1:])
