"""Prometheus metrics: one registry per app or worker process, what the API and the pool
record in it, and the pure ASGI middleware that times HTTP requests by route template."""

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from app.models import TERMINAL_STATES, JobState
from app.store.stats import JobCounts

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# A request that matched no route: its raw path would make a label value per URL.
OTHER_ROUTE = "other"
# Any other method is counted as "other", for the same reason.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

JOB_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
HTTP_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The metrics of one process. Counters and histograms count what happened in this
    process (Prometheus sums them over processes); the job gauges, when this process has
    them, are read from the database at each scrape, so every API node shows the whole."""

    def __init__(self, *, job_gauges: bool = True) -> None:
        # Per app, not prometheus_client's global registry: several apps (tests) in one
        # process must not share counters or collide on names.
        self.registry = CollectorRegistry()
        registry = self.registry
        self.jobs_submitted = Counter(
            "jobdock_jobs_submitted", "Jobs accepted by the API", registry=registry
        )
        self.jobs_finished = Counter(
            "jobdock_jobs_finished",
            "Jobs that reached a terminal state, by that state",
            ["state"],
            registry=registry,
        )
        self._finished = {
            state: self.jobs_finished.labels(state.value) for state in TERMINAL_STATES
        }
        self.job_duration = Histogram(
            "jobdock_job_duration_seconds",
            "From a finished job's (last) start to its end",
            buckets=JOB_DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "jobdock_job_queue_wait_seconds",
            "From a job's submission (a retry: the end of its backoff) to its start",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.engine_errors = Counter(
            "jobdock_engine_errors",
            "Docker engine failures met by the workers, by what they were doing",
            ["operation"],
            registry=registry,
        )
        self.http_requests = Counter(
            "jobdock_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "jobdock_http_request_duration_seconds",
            "Time to answer an HTTP request (a followed log: until its stream ends)",
            ["method", "route"],
            buckets=HTTP_DURATION_BUCKETS,
            registry=registry,
        )
        self.jobs_queued: Gauge | None = None
        self.jobs_running: Gauge | None = None
        self.active_workers: Gauge | None = None
        if job_gauges:
            self.jobs_queued = Gauge(
                "jobdock_jobs_queued", "Jobs queued, from the database", registry=registry
            )
            self.jobs_running = Gauge(
                "jobdock_jobs_running", "Jobs running, from the database", registry=registry
            )
            self.active_workers = Gauge(
                "jobdock_workers_active",
                "Workers (on any node) holding a running job, from the database",
                registry=registry,
            )
        self.worker_slots: Gauge | None = None
        self.worker_slots_busy: Gauge | None = None
        # Label children by their labels: a lookup per request instead of .labels()'s
        # validation and lock.
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    # -- jobs ------------------------------------------------------------------------------

    def job_submitted(self, count: int = 1) -> None:
        self.jobs_submitted.inc(count)

    def job_started(self, waited_since: datetime, started_at: datetime) -> None:
        self.queue_wait.observe(max(0.0, (started_at - waited_since).total_seconds()))

    def job_finished(
        self,
        state: JobState,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
    ) -> None:
        self._finished[state].inc()
        if started_at is not None and finished_at is not None:
            self.job_duration.observe(max(0.0, (finished_at - started_at).total_seconds()))

    def engine_error(self, operation: str) -> None:
        self.engine_errors.labels(operation).inc()

    def watch_pool(self, slots: int, busy: Callable[[], int]) -> None:
        """Expose a worker pool's slots and how many hold a job (read at each scrape)."""
        if self.worker_slots is None:
            self.worker_slots = Gauge(
                "jobdock_worker_slots",
                "Jobs this process's pool runs at once",
                registry=self.registry,
            )
            self.worker_slots_busy = Gauge(
                "jobdock_worker_slots_busy",
                "Slots of this process's pool that hold a job",
                registry=self.registry,
            )
        self.worker_slots.set(slots)
        assert self.worker_slots_busy is not None
        self.worker_slots_busy.set_function(busy)

    # -- exposition ------------------------------------------------------------------------

    def set_job_counts(self, counts: JobCounts) -> None:
        if self.jobs_queued is not None:
            self.jobs_queued.set(counts.by_state[JobState.queued])
        if self.jobs_running is not None:
            self.jobs_running.set(counts.by_state[JobState.running])
        if self.active_workers is not None:
            self.active_workers.set(counts.active_workers)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve the registry on its own port (`jobdock worker --metrics-port`), in a
        thread; the caller shuts the server down."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        logger.info("metrics on http://%s:%d/metrics", host, port)
        return server

    # -- HTTP ------------------------------------------------------------------------------

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        requests = self._requests.get((method, route, status))
        if requests is None:
            requests = self._requests[(method, route, status)] = self.http_requests.labels(
                method, route, str(status)
            )
        duration = self._durations.get((method, route))
        if duration is None:
            duration = self._durations[(method, route)] = self.http_duration.labels(method, route)
        requests.inc()
        duration.observe(seconds)


class HttpMetricsMiddleware:
    """Counts and times every HTTP request by method, route template and status.

    Pure ASGI (BaseHTTPMiddleware would add a task and a stream per request): the clock is
    read once at the start and once at the end, and the route is the template the router
    matched (`/jobs/{job_id}`), which it leaves in the scope; unmatched paths are "other".
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            method = scope["method"]
            self.metrics.observe_request(
                method if method in HTTP_METHODS else "other",
                getattr(route, "path", None) or OTHER_ROUTE,
                status,
                time.perf_counter() - start,
            )
