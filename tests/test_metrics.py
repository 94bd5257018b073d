"""/metrics against real `jobdock serve` and `jobdock worker` processes, parsed with
prometheus_client's own parser: jobs, durations, engine errors, HTTP requests by route."""

import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import HttpMetricsMiddleware, Message, Metrics, Receive, Scope, Send
from tests.support.service import Service, free_port

pytestmark = pytest.mark.docker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by its name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples: Samples, method: str, route: str, status: int) -> float:
    return value(
        samples, "jobdock_http_requests_total", method=method, route=route, status=str(status)
    )


async def scrape(client: httpx.AsyncClient, path: str = "/metrics") -> Samples:
    response = await client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def stats_jobs(svc: Service) -> dict[str, int]:
    response = await svc.client.get("/stats")
    assert response.status_code == 200, response.text
    jobs: dict[str, int] = response.json()["jobs"]
    return jobs


async def test_a_job_run_through_the_service_is_counted_and_timed(
    tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, workers=2) as svc:
        before = await scrape(svc.client)
        assert value(before, "jobdock_jobs_submitted_total") == 0
        assert value(before, "jobdock_worker_slots") == 2
        done = await svc.run(image=test_image, command=["echo", "hi"])
        assert done["state"] == "succeeded"
        # A job id the service does not know: still one route template, never the id.
        unknown = str(uuid.uuid4())
        assert (await svc.client.get(f"/jobs/{unknown}")).status_code == 404
        assert (await svc.client.get(f"/no/such/{unknown}")).status_code == 404
        after = await scrape(svc.client)
        text = (await svc.client.get("/metrics")).text

    assert value(after, "jobdock_jobs_submitted_total") == 1
    assert value(after, "jobdock_jobs_finished_total", state="succeeded") == 1
    assert value(after, "jobdock_jobs_finished_total", state="failed") == 0
    assert value(after, "jobdock_job_duration_seconds_count") == 1
    assert 0 < value(after, "jobdock_job_duration_seconds_sum") < 60
    assert value(after, "jobdock_job_queue_wait_seconds_count") == 1
    assert value(after, "jobdock_jobs_queued") == 0
    assert value(after, "jobdock_jobs_running") == 0
    assert value(after, "jobdock_worker_slots_busy") == 0
    # svc.run polled GET /jobs/{id} at least once; the 404 above added one more.
    got = requests(after, "GET", "/jobs/{job_id}", 200)
    assert got >= 1
    assert requests(after, "GET", "/jobs/{job_id}", 404) == 1
    assert requests(after, "POST", "/jobs", 202) == 1
    assert requests(after, "GET", "other", 404) == 1
    timed = value(
        after, "jobdock_http_request_duration_seconds_count", method="GET", route="/jobs/{job_id}"
    )
    assert timed == got + 1
    # No raw path, and so no id, is ever a label value.
    assert done["id"] not in text and unknown not in text
    routes = {dict(labels).get("route") for _, labels in after} - {None}
    assert routes <= {"/jobs", "/jobs/{job_id}", "/metrics", "/healthz", "other"}, routes


async def test_gauges_are_read_from_the_database_and_cancels_are_counted(tmp_path: Path) -> None:
    # No workers: the jobs stay queued, and a cancel ends them in the API process.
    async with Service(tmp_path, workers=0) as svc:
        jobs = [await svc.submit(image="busybox") for _ in range(2)]
        batch = await svc.client.post(
            "/jobs/batch", json={"jobs": [{"image": "busybox"}, {"image": "busybox"}]}
        )
        assert batch.status_code == 202, batch.text
        assert (await svc.client.post(f"/jobs/{jobs[0]['id']}/cancel")).status_code == 200
        samples = await scrape(svc.client)
        counts = await stats_jobs(svc)

    assert value(samples, "jobdock_jobs_submitted_total") == 4
    assert value(samples, "jobdock_jobs_finished_total", state="cancelled") == 1
    assert value(samples, "jobdock_jobs_queued") == counts["queued"] == 3
    assert value(samples, "jobdock_jobs_running") == counts["running"] == 0
    # This process runs no workers: no slots to show.
    assert ("jobdock_worker_slots", frozenset()) not in samples


async def test_a_missing_image_counts_an_engine_error(tmp_path: Path) -> None:
    # No registry answers here (.invalid never resolves): the pull fails at once.
    async with Service(tmp_path, workers=1) as svc:
        job = await svc.run(image="registry.invalid/jobdock/no-such-image:1", command=["true"])
        samples = await scrape(svc.client)
    assert job["state"] == "failed"
    assert "could not be pulled" in job["error"]
    assert value(samples, "jobdock_engine_errors_total", operation="pull") == 1
    assert value(samples, "jobdock_jobs_finished_total", state="failed") == 1
    assert value(samples, "jobdock_job_duration_seconds_count") == 1


async def test_a_worker_serves_its_metrics_on_its_own_port(tmp_path: Path, test_image: str) -> None:
    port = free_port()
    async with (
        Service(tmp_path, command=["serve", "--no-workers"]) as api,
        Service(tmp_path, command=["worker"], workers=2, metrics_port=port),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as worker,
    ):
        done = await api.run(image=test_image, command=["echo", "hi"])
        assert done["state"] == "succeeded"
        at_worker = await scrape(worker)
        at_api = await scrape(api.client)

    # The worker counts what it ran; the API what it accepted, and the queue from the
    # database. Prometheus adds the processes up.
    assert value(at_worker, "jobdock_jobs_finished_total", state="succeeded") == 1
    assert value(at_worker, "jobdock_job_duration_seconds_count") == 1
    assert value(at_worker, "jobdock_worker_slots") == 2
    assert value(at_worker, "jobdock_jobs_submitted_total") == 0
    assert ("jobdock_jobs_queued", frozenset()) not in at_worker
    assert value(at_api, "jobdock_jobs_submitted_total") == 1
    assert value(at_api, "jobdock_jobs_finished_total", state="succeeded") == 0
    assert ("jobdock_jobs_queued", frozenset()) in at_api


async def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.job_submitted(3)
    assert value(parse(first.exposition().decode()), "jobdock_jobs_submitted_total") == 3
    assert value(parse(second.exposition().decode()), "jobdock_jobs_submitted_total") == 0


async def test_the_middleware_labels_unknown_methods_and_paths_as_other() -> None:
    metrics = Metrics()
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 405})

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    middleware = HttpMetricsMiddleware(app, metrics)
    await middleware({"type": "http", "method": "BREW", "path": "/coffee/123"}, receive, send)
    samples = parse(metrics.exposition().decode())
    assert sent == [{"type": "http.response.start", "status": 405}]
    assert requests(samples, "other", "other", 405) == 1
