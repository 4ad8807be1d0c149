"""What tests and benches read from the real Argo CD and the tenant side: Application status, errors seen
over time, the tenant audit log (who did what, with which credential) and the exec calls the controller made."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from keyless.envtest.argocd import NAMESPACE
from keyless.envtest.stack import KeylessStack
from keyless.envtest.tenants import CREDENTIAL_ID_EXTRA

# Conditions Argo CD sets when it cannot compare, sync or even accept an Application.
ERROR_CONDITIONS = ("ComparisonError", "SyncError", "UnknownError", "InvalidSpecError")
# Argo CD's client user agent ("argocd-v3.5.3/... kubernetes/..."); of its processes only the application
# controller talks to tenant clusters here (the exec-call log ties each credential read to its PID).
ARGOCD_USER_AGENT = "argocd-"


def application(stack: KeylessStack, name: str) -> dict | None:
    return stack.get(stack.control, "application", name, "-n", NAMESPACE)


def sync_state(app: dict | None) -> tuple[str, str, str]:
    """(sync status, health status, synced revision) of an Application ('' where not known yet)."""
    status = (app or {}).get("status") or {}
    return (status.get("sync", {}).get("status", ""), status.get("health", {}).get("status", ""),
            status.get("sync", {}).get("revision", ""))


def errors_of(app: dict | None) -> list[str]:
    """What an Application shows as going wrong, as 'Kind: message' strings: error conditions, a failed
    operation, an operation being retried after a failure, and resources its last sync could not apply."""
    status = (app or {}).get("status") or {}
    found = [f"{c['type']}: {c.get('message', '')}" for c in status.get("conditions") or []
             if c.get("type") in ERROR_CONDITIONS]
    operation = status.get("operationState") or {}
    if operation.get("phase") in ("Failed", "Error"):
        found.append(f"Operation{operation['phase']}: {operation.get('message', '')}")
    elif operation.get("phase") == "Running" and operation.get("retryCount"):
        found.append(f"OperationRetrying: {operation.get('message', '')}")
    for resource in (operation.get("syncResult") or {}).get("resources") or []:
        if resource.get("status") == "SyncFailed":
            found.append(f"SyncFailed {resource.get('kind')}/{resource.get('name')}: {resource.get('message', '')}")
    return found


def wait_synced(stack: KeylessStack, name: str, revision: str | None = None, timeout: float = 180.0) -> dict:
    """Waits until the Application is Synced and Healthy (at `revision` if given); fails with its status."""
    deadline = time.monotonic() + timeout
    app = None
    while time.monotonic() < deadline:
        app = application(stack, name)
        sync, health, synced = sync_state(app)
        if sync == "Synced" and health == "Healthy" and (revision is None or synced == revision):
            return app
        time.sleep(1)
    raise AssertionError(f"Application {name} not Synced/Healthy{' at ' + revision if revision else ''} in "
                         f"{timeout:.0f}s: {sync_state(app)} {errors_of(app)}\n{stack.logs()}")


@dataclass
class ErrorSeen:
    at: float  # epoch seconds
    application: str
    message: str


@dataclass
class ApplicationMonitor:
    """Polls Applications every second in the background and records every error they show, with its time."""

    stack: KeylessStack
    names: list[str]
    interval: float = 1.0
    seen: list[ErrorSeen] = field(default_factory=list)
    polls: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="application-monitor", daemon=True)

    def __enter__(self) -> "ApplicationMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name in self.names:
                try:
                    app = application(self.stack, name)
                except Exception as e:  # the control plane answering is not what is watched here
                    self.seen.append(ErrorSeen(time.time(), name, f"monitor could not read: {e}"))
                    continue
                for message in errors_of(app):
                    self.seen.append(ErrorSeen(time.time(), name, message))
            self.polls += 1
            self._stop.wait(self.interval)

    def errors_between(self, start: float, end: float) -> list[ErrorSeen]:
        return [e for e in self.seen if start <= e.at <= end]


def audit_time(event: dict) -> float:
    return datetime.fromisoformat(event["stageTimestamp"].replace("Z", "+00:00")).timestamp()


def controller_requests(events: list[dict], username: str, start: float = 0.0, end: float = float("inf")) -> list[dict]:
    """Requests Argo CD made as `username` (by its user agent), in [start, end]."""
    return [e for e in events if (e.get("user") or {}).get("username") == username
            and (e.get("userAgent") or "").startswith(ARGOCD_USER_AGENT) and start <= audit_time(e) <= end]


def credential_ids(events: list[dict]) -> list[str]:
    """The distinct credentials (JWT ids, from user.extra) the requests carried, in order of first use."""
    ordered: dict[str, None] = {}
    for e in sorted(events, key=audit_time):
        for value in ((e.get("user") or {}).get("extra") or {}).get(CREDENTIAL_ID_EXTRA, []):
            ordered.setdefault(value, None)
    return list(ordered)


def unauthenticated(events: list[dict], start: float = 0.0, end: float = float("inf")) -> list[dict]:
    """Requests the tenant answered 401 (failed authentication is audited too)."""
    return [e for e in events if (e.get("responseStatus") or {}).get("code") == 401 and start <= audit_time(e) <= end]


@dataclass(frozen=True)
class ExecCall:
    parent_pid: int
    at: float
    args: str


def exec_calls(log: Path) -> list[ExecCall]:
    """What the parent-PID-logging `cat` wrapper recorded: one line per exec call."""
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    calls = []
    for line in lines:
        pid, at, args = line.split(" ", 2)
        calls.append(ExecCall(int(pid), float(at), args))
    return calls
