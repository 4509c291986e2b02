"""
What the supervisor shows of its workers: their metrics and status, merged.

Every L{REPORT_INTERVAL} seconds the supervisor asks each worker for a
report (L{dcrouter.workers.pool}); a worker answers with one JSON line: its
Prometheus exposition and its part of the status page. Metrics are merged
by adding up samples with the same name and labels (counters and gauges of
connections, bytes, requests), except target health, where a target is up
if any worker has it up. The admin listener thus shows one daemon, at most
one interval old. The counters of a worker that exited (crashed, or retired
by a reload and drained) stay in the sum, from its last report
(L{RetiredCounters}): Prometheus would take a total that goes down for a
reset, and count the whole total again as new; its gauges go with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

#: Seconds between two reports of a worker.
REPORT_INTERVAL = 2.0

#: Families merged by maximum rather than sum: 1 if any worker has the target up.
_BY_MAXIMUM = frozenset({"dcrouter_target_up"})

Report = dict[str, Any]


def mergeFamilies(families: Iterable[Metric]) -> list[Metric]:
    """Metric families with samples of the same name and labels combined into one."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in families:
        into = merged.setdefault(
            family.name, Metric(family.name, family.documentation, family.type)
        )
        samples = values.setdefault(into.name, {})
        combine = max if family.name in _BY_MAXIMUM else (lambda a, b: a + b)
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            held = samples.get(key)
            samples[key] = sample.value if held is None else combine(held, sample.value)
    for name, family in merged.items():
        for (sampleName, labels), value in values[name].items():
            family.add_sample(sampleName, dict(labels), value)
    return list(merged.values())


def _parsed(texts: Iterable[str]) -> Iterator[Metric]:
    for text in texts:
        yield from text_string_to_metric_families(text)


def mergeMetrics(texts: Sequence[str]) -> list[Metric]:
    """The families of several expositions, samples with the same labels combined."""
    return mergeFamilies(_parsed(texts))


class RetiredCounters:
    """
    The counters of the workers that have exited, added up from the last
    report of each: what they counted stays in the supervisor's totals, so
    these never go down when a worker dies or a reload replaces it. (Only
    counters: a gauge of a process that is gone measures nothing.) The same
    for the status page's counts: connections accepted and refused.
    """

    def __init__(self) -> None:
        self.families: list[Metric] = []
        self.accepted = 0
        self.refused: dict[str, int] = {}

    def add(self, report: Report) -> None:
        """Keep the counters of C{report}, a worker's last one."""
        counters = [
            family for family in _parsed([report.get("metrics", "")])
            if family.type == "counter"
        ]
        if counters:
            self.families = mergeFamilies([*self.families, *counters])
        connections = report.get("status", {}).get("connections", {})
        self.accepted += connections.get("accepted", 0)
        for reason, count in connections.get("refused", {}).items():
            self.refused[reason] = self.refused.get(reason, 0) + count


class WorkerMetrics(Collector):
    """The workers' router metrics, merged, for the supervisor's registry."""

    def __init__(self, reports: Callable[[], list[Report]], retired: RetiredCounters) -> None:
        self.reports = reports
        self.retired = retired

    def collect(self) -> Iterator[Metric]:
        texts = [report.get("metrics", "") for report in self.reports()]
        yield from mergeFamilies([*self.retired.families, *_parsed(texts)])


def mergeStatus(reports: Sequence[Report], retired: RetiredCounters) -> Report:
    """
    The workers' part of the status page: connections summed (with those the
    exited workers accepted and refused), targets joined.
    """
    active = 0
    accepted = retired.accepted
    refused = dict(retired.refused)
    targets: dict[tuple[str, str], dict[str, Any]] = {}
    for report in reports:
        status = report.get("status", {})
        connections = status.get("connections", {})
        active += connections.get("active", 0)
        accepted += connections.get("accepted", 0)
        for reason, count in connections.get("refused", {}).items():
            refused[reason] = refused.get(reason, 0) + count
        for target in status.get("targets", []):
            key = (target.get("pool", ""), target.get("address", ""))
            held = targets.get(key)
            if held is None:
                targets[key] = dict(target)
            else:
                held["up"] = held.get("up") or target.get("up")
                held["active"] = held.get("active", 0) + target.get("active", 0)
    return {
        "connections": {"active": active, "accepted": accepted, "refused": refused},
        "targets": list(targets.values()),
        "workers": len(reports),
    }
