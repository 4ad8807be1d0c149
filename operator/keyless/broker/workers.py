"""Several broker processes on one port (`--workers N`): the broker uses more than one core.

Python signs on one core at a time, and at ~11,000 tokens/s one broker process is CPU-bound (TLS and
HTTP cost more than the signature). With `--workers N` the first process (worker 0) starts N-1 more
that listen on the same address with SO_REUSEPORT: the kernel spreads new connections over them.

What the workers share, and how:
- the signing keys: every worker follows the key Secret; only worker 0 competes for the key writer
  Lease, so N workers per pod never fight over it (the Lease still elects one writer per Deployment);
- the rate limits: each worker enforces 1/N of every limit, so a caller gets at most the configured
  limit in total, never N times it. The price: a caller whose requests all arrive on one connection
  (hence one worker) gets 1/N of it. The agent and the operator keep a small pool of connections,
  and the limits are per second, not per connection, so this matters only near the limit;
- the TokenReview cache is per worker: a caller's token is reviewed once per worker per cache period
  (N reviews instead of one), which the API server does not notice at these rates;
- metrics: each worker writes a snapshot of its own metrics every few seconds and whenever it answers
  a scrape; whichever worker answers adds the others' snapshots to its own (counters and histograms
  summed, gauges the largest), so a scrape of the pod shows one broker whatever worker answers it,
  its counters never going down from one scrape to the next (the others' parts may lag a few seconds);
- the audit log: each worker writes whole lines in writes of at most PIPE_BUF bytes, so the lines of
  two workers never tear each other on the shared stdout.

Worker 0 restarts a worker that exits; when worker 0 exits, the others follow (parent-death signal),
and the container restarts as a whole.
"""
from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("keyless.broker.workers")

WORKER_ENV = "KEYLESS_BROKER_WORKER"
SNAPSHOT_SECONDS = 5.0
# A snapshot older than this belongs to a worker that is gone (or hung): it is left out of scrapes.
SNAPSHOT_MAX_AGE_SECONDS = 60.0


@dataclass(frozen=True)
class WorkerRole:
    """Which of the pod's broker processes this is."""

    index: int = 0
    count: int = 1
    directory: Path | None = None  # where workers leave their metrics snapshots (count > 1)

    @property
    def writes_keys(self) -> bool:
        """Only worker 0 competes for the key writer Lease."""
        return self.index == 0

    @property
    def shared_port(self) -> bool:
        return self.count > 1

    def share(self, limit: float) -> float:
        """This worker's part of a limit the whole pod enforces."""
        return limit / self.count

    def snapshot_path(self, index: int | None = None) -> Path:
        assert self.directory is not None
        return self.directory / f"worker-{self.index if index is None else index}.prom"

    def to_env(self, args: dict) -> str:
        return json.dumps({"index": self.index, "count": self.count, "directory": str(self.directory),
                           "args": args})

    @classmethod
    def from_env(cls, text: str) -> tuple["WorkerRole", dict]:
        data = json.loads(text)
        return cls(int(data["index"]), int(data["count"]), Path(data["directory"])), data["args"]


# ---- worker 0 starts and keeps the others ---------------------------------------------------------
def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class WorkerPool:
    """Runs in worker 0: starts workers 1..N-1 with the same arguments and restarts any that exits."""

    def __init__(self, role: WorkerRole, args: dict):
        self.role = role
        self.args = args
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False

    async def _start(self, index: int) -> asyncio.subprocess.Process:
        role = WorkerRole(index, self.role.count, self.role.directory)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "keyless.broker.worker", env={**os.environ, WORKER_ENV: role.to_env(self.args)},
            preexec_fn=_die_with_parent, stdin=asyncio.subprocess.DEVNULL)
        self.processes[index] = process
        return process

    async def _keep(self, index: int) -> None:
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            process = await self._start(index)
            code = await process.wait()
            if self._stopping:
                return
            # A worker that ran for a while gets restarted at once; one that keeps failing, slower.
            failures = 0 if time.monotonic() - started > 60 else failures + 1
            delay = min(30.0, 0.5 * 2 ** failures) if failures else 0.0
            log.warning("broker worker %d exited with code %s; restarting it in %.1fs", index, code, delay)
            self.restarts += 1
            await asyncio.sleep(delay)

    async def run(self) -> None:
        await asyncio.gather(*(self._keep(i) for i in range(1, self.role.count)))

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                try:
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                process.kill()


# ---- metrics of the whole pod -----------------------------------------------------------------------
class SharedMetrics:
    """Every worker's snapshot writer, and the scrape answer that adds the other workers' snapshots."""

    def __init__(self, role: WorkerRole, registry: CollectorRegistry):
        self.role = role
        self.registry = registry

    def write_snapshot(self, exposition: bytes | None = None) -> bytes:
        exposition = generate_latest(self.registry) if exposition is None else exposition
        path = self.role.snapshot_path()
        temp = path.with_suffix(".tmp")
        temp.write_bytes(exposition)
        os.replace(temp, path)
        return exposition

    async def run(self) -> None:
        while True:
            try:
                self.write_snapshot()
            except OSError as e:
                log.warning("metrics snapshot not written: %s", e)
            await asyncio.sleep(SNAPSHOT_SECONDS)

    def others(self) -> list[str]:
        texts = []
        now = time.time()
        for index in range(self.role.count):
            if index == self.role.index:
                continue
            path = self.role.snapshot_path(index)
            try:
                if now - path.stat().st_mtime > SNAPSHOT_MAX_AGE_SECONDS:
                    continue
                texts.append(path.read_text())
            except (OSError, UnicodeDecodeError):
                continue
        return texts

    def render(self) -> bytes:
        # The answering worker's own part is stored before it answers: a later scrape answered by another
        # worker then reads at least these numbers, so the pod's counters never go down between scrapes
        # (Prometheus would take that for a restart).
        try:
            own = self.write_snapshot()
        except OSError:
            own = generate_latest(self.registry)
        return merge_expositions([own.decode(), *self.others()])


def merge_expositions(texts: list[str]) -> bytes:
    """One exposition from several processes' expositions of the same metrics: counters and histograms
    summed per series, `_created` the earliest, other gauges the largest (key age, targets, writer)."""
    families: dict[str, object] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            kept = families.setdefault(family.name, family)
            merged = values.setdefault(family.name, {})
            if kept is not family and kept.type != family.type:
                continue
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in merged:
                    merged[key] = sample.value
                elif family.type in ("counter", "histogram", "summary"):
                    merged[key] += sample.value
                elif family.name.endswith("_created"):
                    merged[key] = min(merged[key], sample.value)
                else:
                    merged[key] = max(merged[key], sample.value)

    class _Merged:
        def collect(self):
            for name, family in families.items():
                family.samples = [Sample(sample_name, dict(labels), value)
                                  for (sample_name, labels), value in values[name].items()]
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)
