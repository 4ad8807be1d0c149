"""Turning real scrapes into `promtool test rules` input, so the chart's alert rules are evaluated by
Prometheus' own engine against the metrics the real operator, broker, agent and webhooks served.

A `Scraper` reads each process's /metrics every `interval` seconds, labelled as the Prometheus
Operator would label the target (job, namespace, pod). A window of scrapes becomes input series; since
alerts wait (`for:`) minutes to hours while a test may break something for seconds, the broken state
observed at the end of the window is held: every series that was still rising (counters, ages) keeps
rising at the rate seen over its last samples, every other series keeps its last value. promtool then
evaluates the real rule file at the end of that and says which alerts fire, with which labels and
rendered annotations.
"""
from __future__ import annotations

import re
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from keyless.envtest import binaries

SLOPE_SAMPLES = 5


@dataclass
class Target:
    url: str
    labels: dict[str, str]
    context: ssl.SSLContext | None = None


@dataclass
class Scraper:
    targets: dict[str, Target]
    interval: float = 2.0
    scrapes: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def start(self) -> "Scraper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def mark(self) -> int:
        """The index of the next scrape: where a window starts."""
        with self._lock:
            return len(self.scrapes)

    def window(self, start: int, end: int | None = None) -> list[dict[str, float]]:
        with self._lock:
            return list(self.scrapes[start:end])

    def wait_scrapes(self, count: int) -> None:
        target = self.mark() + count
        deadline = time.monotonic() + count * self.interval * 10 + 30
        while self.mark() < target:
            assert self._thread.is_alive(), "the scraper stopped"
            assert time.monotonic() < deadline, f"{count} scrapes did not happen in time"
            time.sleep(self.interval / 4)

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            sample: dict[str, float] = {}
            # A copy: tests add and remove targets while this runs.
            for target in list(self.targets.values()):
                sample.update(scrape(target))
            with self._lock:
                self.scrapes.append(sample)
            next_tick += self.interval
            self._stop.wait(max(0.0, next_tick - time.monotonic()))


def _series_name(name: str, labels: dict[str, str]) -> str:
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def scrape(target: Target) -> dict[str, float]:
    """Keyless's series of one target (an unreachable target gives none, as a failed scrape would)."""
    try:
        with urllib.request.urlopen(target.url, context=target.context, timeout=5) as response:
            text = response.read().decode()
    except (OSError, ValueError):  # down, refused, cut off: a failed scrape, as Prometheus would see it
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("keyless_") or sample.name.endswith("_created"):
                continue
            out[_series_name(sample.name, {**sample.labels, **target.labels})] = float(sample.value)
    return out


def _number(value: float) -> str:
    if value == float("inf"):
        return "Inf"
    return repr(round(value, 6))


def input_series(scrapes: list[dict[str, float]], extend_samples: int) -> list[dict]:
    """promtool input series: the scraped values, then the last state held for `extend_samples` more."""
    names = sorted({name for sample in scrapes for name in sample})
    series = []
    for name in names:
        values = [sample.get(name) for sample in scrapes]
        present = [v for v in values if v is not None]
        text = " ".join("_" if v is None else _number(v) for v in values)
        last = present[-1]
        recent = present[-SLOPE_SAMPLES:]
        rising = len(recent) > 1 and all(b >= a for a, b in zip(recent, recent[1:])) and recent[-1] > recent[0]
        slope = (recent[-1] - recent[0]) / (len(recent) - 1) if rising else 0.0
        if values[-1] is None:
            text += f" _x{extend_samples}"  # gone (e.g. a stopped process): stays gone
        elif slope and last != float("inf"):
            text += f" {_number(last + slope)}+{_number(slope)}x{extend_samples - 1}"
        else:
            text += f" {_number(last)}x{extend_samples - 1}"
        series.append({"series": name, "values": text})
    return series


_LABEL_TEMPLATE = re.compile(r"\{\{\s*\$labels\.(\w+)\s*\}\}")


def rules(rules_file: Path) -> dict[str, dict]:
    """The alerting rules of a rule file by name."""
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def expected_alert(rule: dict, labels: dict[str, str]) -> dict:
    """What promtool should report for `rule` firing with these labels: the rule's own labels added, and
    its annotations rendered (they use only {{ $labels.x }})."""
    def render(text: str) -> str:
        return _LABEL_TEMPLATE.sub(lambda m: labels.get(m.group(1), ""), text)
    return {"exp_labels": {**labels, **rule.get("labels", {})},
            "exp_annotations": {k: render(v) for k, v in rule.get("annotations", {}).items()}}


def promtool_test(rules_file: Path, directory: Path, scrapes: list[dict[str, float]], interval: float,
                  expect: dict[str, list[dict[str, str]]], hold_seconds: float) -> subprocess.CompletedProcess:
    """Runs `promtool test rules`: at the end of the scrapes plus `hold_seconds`, exactly the alerts in
    `expect` (name -> labels of each firing instance; [] = must not fire) fire."""
    assert scrapes, "no scrapes in the window"
    extend = int(hold_seconds / interval) + 1
    known = rules(rules_file)
    eval_seconds = int((len(scrapes) - 1 + extend) * interval)
    test = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "30s",
        "tests": [{
            "interval": f"{interval:g}s",
            "input_series": input_series(scrapes, extend),
            "alert_rule_test": [{"eval_time": f"{eval_seconds}s", "alertname": name,
                                 "exp_alerts": [expected_alert(known[name], labels) for labels in firing]}
                                for name, firing in expect.items()],
        }],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "alerts-test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False, width=1 << 16))
    return subprocess.run([str(binaries.find("promtool")), "test", "rules", str(path)],
                          capture_output=True, text=True, timeout=300)
