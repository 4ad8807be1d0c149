"""What the broker benchmarks share: a local API server, the real broker over TLS, one BrokerTarget
(`tenants.bench`) and a Pod-bound caller token allowed to mint for it."""
from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyless.envtest.cluster import LocalCluster  # noqa: E402
from tests.broker_fixtures import (CRD_DIR, BrokerProcess, apply_broker_target, bound_caller_token,  # noqa: E402
                                   caller_pod, ensure_namespace, service_account_username, start_broker)
from tests.helpers import install_crds  # noqa: E402

TARGET = "tenants.bench"


@dataclass
class BrokerWorld:
    workdir: Path
    cluster: LocalCluster
    broker: BrokerProcess
    token: str  # the caller's Pod-bound token


@contextlib.contextmanager
def broker_world(prefix: str, *broker_args: str, keep: bool = False):
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = LocalCluster("bench", workdir / "cluster", controller_manager=False).start()
    broker = None
    try:
        from kubernetes import config as kconfig

        api = kconfig.new_client_from_config(config_file=str(cluster.kubeconfig))
        install_crds(cluster, CRD_DIR / "brokertargets.keyless.dev.yaml")
        for ns in ("keyless-system", "argocd"):
            ensure_namespace(api, ns)
        caller = service_account_username("argocd", "argocd-application-controller")
        apply_broker_target(api, "keyless-system", TARGET, audience="keyless:tenants:bench",
                            username="keyless:bench:argocd", allowed_callers=[caller], ttl=60)
        pod = caller_pod(api, "argocd", "argocd-application-controller", "argocd-application-controller-0")
        token = bound_caller_token(api, pod)
        broker = start_broker(cluster, "keyless-system", workdir / "broker", *broker_args)
        warm = broker.mint(TARGET, token)
        if warm.status_code != 200:
            raise RuntimeError(f"warm-up mint failed: {warm.status_code} {warm.text}")
        yield BrokerWorld(workdir, cluster, broker, token)
    finally:
        if broker is not None:
            broker.stop()
        cluster.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"  work directory kept: {workdir}")
