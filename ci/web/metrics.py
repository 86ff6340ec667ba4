"""``/metrics`` in the Prometheus text format, through prometheus-client, on a
registry of the web process's own (nothing global, so two apps in one
process, as in the tests, do not collide).

Counted from the dispatcher's ``watch`` events as the web process sees them
(``tracker``): a counter restarts at 0 with the process, as Prometheus
expects of counters. Gauges are the live picture.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
RUNNER_STATES = ("idle", "busy", "draining", "drained", "dead")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.finished = Counter("tinyci_builds_finished", "Builds that ended, by status and job",
                                ["status", "job"], registry=r)
        self.queued = Gauge("tinyci_builds_queued", "Builds waiting for a runner", registry=r)
        self.running = Gauge("tinyci_builds_running", "Builds running now", registry=r)
        self.runners = Gauge("tinyci_runners", "Runners the dispatcher knows, by state", ["state"], registry=r)
        self.duration = Histogram("tinyci_build_duration_seconds", "Build duration, started to finished",
                                  ["job"], buckets=DURATION_BUCKETS, registry=r)
        self.wait = Histogram("tinyci_build_queue_wait_seconds", "Time from queued to first started",
                              buckets=WAIT_BUCKETS, registry=r)
        self.connected = Gauge("tinyci_web_dispatcher_connected",
                               "1 while the web process follows the dispatcher's events", registry=r)
        for state in RUNNER_STATES:
            self.runners.labels(state).set(0)

    def build_finished(self, build: dict) -> None:
        job = build.get("job") or ""
        self.finished.labels(build["status"], job).inc()
        if build.get("duration") is not None:
            self.duration.labels(job).observe(max(0.0, build["duration"]))

    def build_started(self, build: dict) -> None:
        if build.get("started_at") is not None and build.get("created_at") is not None:
            self.wait.observe(max(0.0, build["started_at"] - build["created_at"]))

    def picture(self, queued: int, running: int, runners: dict[str, int], connected: bool) -> None:
        self.queued.set(queued)
        self.running.set(running)
        for state in RUNNER_STATES:
            self.runners.labels(state).set(runners.get(state, 0))
        self.connected.set(1 if connected else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
