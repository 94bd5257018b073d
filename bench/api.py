"""Part 2: the API under load, beside the framework limit.

32 concurrent clients, each sending its next request as soon as the last one answered
(closed loop), against:
  - a bare FastAPI app (bench/bare_app.py) that returns a constant JSON, served by uvicorn
    with the options of `jobdock serve`, in its own process: the framework limit (the
    ratios' target is against it); beside it, for context, the same app's POST of Jobdock's
    body validated as JobCreate with a constant answer (the framework's share of a POST);
  - Jobdock `POST /jobs` and `GET /jobs/{id}` (API only: JOBDOCK_WORKERS=0, so the
    submitted jobs stay queued and no container competes for the CPU);
  - `GET /jobs/{id}` while a Jobdock with 4 workers is saturated: 4 `sleep` jobs running
    and 8 more queued.
The load generator is `wrk` (one thread) when installed, and beside it 32 aiohttp tasks
in this process (`--api-client`: auto, wrk, aiohttp, httpx, both). httpx was tried first:
on this machine it tops out near 200 req/s against the bare app, so it measures itself.
Interleaved bare/bare POST/POST/GET per round, medians of the rounds.
"""

import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.common import (
    BenchError,
    Database,
    Results,
    check,
    median,
    percentile,
    profiled,
    running_service,
)
from tests.support.service import Service, free_port

CLIENTS = 32
JOB_BODY = {"image": "jobdock-test-busybox:latest", "command": ["echo", "hi"]}

WRK_SCRIPT = """
wrk.method = "{method}"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n",
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Load:
    requests_per_second: float
    p50: float
    p99: float


class BareApp:
    """bench/bare_app.py in its own process."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"bare-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> "BareApp":
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.bare_app", "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        async with httpx.AsyncClient(base_url=self.url) as client:
            for _ in range(300):
                try:
                    response = await client.get("/constant")
                    if response.status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise BenchError(f"the bare app did not start: {self.log_path.read_text()[-2000:]}")

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def wrk_load(url: str, method: str, body: dict[str, Any] | None, seconds: float) -> Load:
    script = WRK_SCRIPT.format(method=method, body=json.dumps(body) if body else "")
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as file:
        file.write(script)
        file.flush()
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{CLIENTS}",
                f"-d{seconds:g}s",
                "--timeout",
                "30s",
                "-s",
                file.name,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    check(bool(lines), f"wrk gave no result: {out.stdout} {out.stderr}")
    requests, duration, connect, read, write, status, timeout, p50, p99 = (
        int(x) for x in lines[0].split()[1:]
    )
    check(requests > 0, f"wrk made no request to {url}")
    check(
        connect + read + write + status + timeout == 0,
        f"wrk {method} {url}: errors connect={connect} read={read} write={write} "
        f"status={status} timeout={timeout} of {requests}",
    )
    return Load(requests / (duration / 1e6), p50 / 1e6, p99 / 1e6)


async def python_load(
    kind: str,
    url: str,
    method: str,
    body: dict[str, Any] | None,
    seconds: float,
    expect: int,
    pace: float | None = None,
) -> Load:
    """32 tasks in a closed loop on one client (aiohttp or httpx); with `pace`, each task
    sends one request per `pace` seconds."""
    latencies: list[float] = []
    end = 0.0

    async def worker(send: Callable[[], Awaitable[int]]) -> None:
        if pace is not None:
            # Spread the clients over the period: no synchronized bursts of 32.
            await asyncio.sleep(random.uniform(0, pace))
        while (now := time.perf_counter()) < end:
            status = await send()
            latencies.append(time.perf_counter() - now)
            check(status == expect, f"{method} {url}: {status}, expected {expect}")
            if pace is not None:
                await asyncio.sleep(max(0.0, pace - (time.perf_counter() - now)))

    start = time.perf_counter()
    end = start + seconds
    if kind == "aiohttp":
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def send_aiohttp() -> int:
                async with session.request(method, url, json=body) as response:
                    await response.read()
                    return response.status

            await asyncio.gather(*(worker(send_aiohttp) for _ in range(CLIENTS)))
    else:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:

            async def send_httpx() -> int:
                return (await client.request(method, url, json=body)).status_code

            await asyncio.gather(*(worker(send_httpx) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - start
    return Load(len(latencies) / elapsed, percentile(latencies, 0.5), percentile(latencies, 0.99))


async def load(
    client: str, url: str, method: str, body: dict[str, Any] | None, seconds: float, expect: int
) -> Load:
    if client == "wrk":
        return await asyncio.to_thread(wrk_load, url, method, body, seconds)
    return await python_load(client, url, method, body, seconds, expect)


async def check_answers(service: Service, bare: BareApp) -> str:
    """One of each request, checked by hand; the id of a job to GET under load."""
    async with httpx.AsyncClient() as client:
        constant = await client.get(f"{bare.url}/constant")
        check(constant.json()["answer"] == 42, f"bare app answered {constant.text}")
        validated = await client.post(f"{bare.url}/validated", json=JOB_BODY)
        check(validated.status_code == 202, f"bare app POST answered {validated.text}")
        refused = await client.post(f"{bare.url}/validated", json={"command": ["true"]})
        check(refused.status_code == 422, f"bare app took a body without an image: {refused.text}")
        posted = await client.post(f"{service.url}/jobs", json=JOB_BODY)
        check(posted.status_code == 202, f"POST /jobs {posted.status_code} {posted.text}")
        job = posted.json()
        check(job["state"] == "queued" and job["image"] == JOB_BODY["image"], str(job))
        got = await client.get(f"{service.url}/jobs/{job['id']}")
        check(got.status_code == 200 and got.json()["id"] == job["id"], got.text)
        job_id: str = job["id"]
        return job_id


def fmt(result: Load) -> str:
    return f"{result.requests_per_second:.0f} req/s, p50 {result.p50 * 1000:.1f} ms, " + (
        f"p99 {result.p99 * 1000:.1f} ms"
    )


async def run(
    results: Results,
    *,
    workdir: Path,
    database: Database,
    seconds: float,
    rounds: int,
    clients: list[str],
    profile_dir: Path | None,
) -> None:
    part = "2 API"
    async with (
        BareApp(workdir) as bare,
        running_service(workdir, database, workers=0) as service,
    ):
        job_id = await check_answers(service, bare)
        pid = service.process.pid if service.process else 0
        for client in clients:
            runs: dict[str, list[Load]] = {"bare": [], "bare_post": [], "post": [], "get": []}
            for index in range(rounds):
                runs["bare"].append(
                    await load(client, f"{bare.url}/constant", "GET", None, seconds, 200)
                )
                runs["bare_post"].append(
                    await load(client, f"{bare.url}/validated", "POST", JOB_BODY, seconds, 202)
                )
                profile = profile_dir is not None and index == 0 and client == clients[0]
                with profiled(
                    pid,
                    profile_dir / "api-post.txt" if profile_dir and profile else None,
                    seconds + 5,
                ):
                    runs["post"].append(
                        await load(client, f"{service.url}/jobs", "POST", JOB_BODY, seconds, 202)
                    )
                with profiled(
                    pid,
                    profile_dir / "api-get.txt" if profile_dir and profile else None,
                    seconds + 5,
                ):
                    runs["get"].append(
                        await load(
                            client, f"{service.url}/jobs/{job_id}", "GET", None, seconds, 200
                        )
                    )
                print(
                    f"  {client} round {index + 1}: "
                    + ", ".join(f"{k} {v[-1].requests_per_second:.0f}/s" for k, v in runs.items()),
                    flush=True,
                )
            summary = {
                name: Load(
                    median([r.requests_per_second for r in loads]),
                    median([r.p50 for r in loads]),
                    median([r.p99 for r in loads]),
                )
                for name, loads in runs.items()
            }
            results.add(
                part,
                f"bare FastAPI GET constant ({client}, {CLIENTS} clients)",
                fmt(summary["bare"]),
            )
            post_to_bare_post = (
                summary["post"].requests_per_second / summary["bare_post"].requests_per_second
            )
            results.add(
                part,
                f"bare FastAPI POST of the same body, validated as JobCreate, constant answer "
                f"({client}); Jobdock POST /jobs's ratio to it",
                f"{fmt(summary['bare_post'])}; {post_to_bare_post:.2f}",
            )
            for name, label in (("post", "POST /jobs"), ("get", "GET /jobs/{id}")):
                # Per round against the bare run just before it, then the median.
                ratio = median(
                    [
                        ours.requests_per_second / theirs.requests_per_second
                        for ours, theirs in zip(runs[name], runs["bare"], strict=True)
                    ]
                )
                results.add(
                    part,
                    f"Jobdock {label} ({client}); ratio to bare",
                    f"{fmt(summary[name])}; {ratio:.2f}",
                    ">= 0.5",
                    ratio >= 0.5,
                )

    # GET /jobs/{id} while every worker is busy and jobs are queued.
    async with running_service(workdir, database, workers=4) as service:
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
            ids = []
            for _ in range(12):
                response = await http.post(
                    "/jobs",
                    json={**JOB_BODY, "command": ["sleep", "600"], "timeout_seconds": 900},
                )
                check(response.status_code == 202, response.text)
                ids.append(response.json()["id"])
            deadline = time.monotonic() + 60
            while True:
                states = [(await http.get(f"/jobs/{i}")).json()["state"] for i in ids]
                if states.count("running") == 4 and states.count("queued") == 8:
                    break
                check(time.monotonic() < deadline, f"pool not saturated: {states}")
                await asyncio.sleep(0.2)
            try:
                for client_name in clients:
                    loads = [
                        await load(
                            client_name, f"{service.url}/jobs/{ids[0]}", "GET", None, seconds, 200
                        )
                        for _ in range(rounds)
                    ]
                    p99 = median([r.p99 for r in loads])
                    results.add(
                        part,
                        f"GET /jobs/{{id}} at {CLIENTS} clients flat out, pool saturated "
                        f"({client_name}), p99",
                        f"{p99 * 1000:.1f} ms ({median([r.requests_per_second for r in loads]):.0f}"
                        " req/s)",
                        "<= 50 ms",
                        p99 <= 0.050,
                    )
                # One client, one request at a time: the latency of a GET itself.
                alone = []
                for _ in range(300):
                    began = time.perf_counter()
                    response = await http.get(f"/jobs/{ids[0]}")
                    alone.append(time.perf_counter() - began)
                    check(response.status_code == 200, response.text)
                results.add(
                    part,
                    "GET /jobs/{id} one client, one at a time, pool saturated, p50 / p99",
                    f"{percentile(alone, 0.5) * 1000:.1f} ms / "
                    f"{percentile(alone, 0.99) * 1000:.1f} ms",
                    "<= 50 ms",
                    percentile(alone, 0.99) <= 0.050,
                )
                # The same at a moderate rate: 32 clients, 2 requests/s each, spread out.
                paced = [
                    await python_load(
                        "aiohttp",
                        f"{service.url}/jobs/{ids[0]}",
                        "GET",
                        None,
                        seconds,
                        200,
                        pace=0.5,
                    )
                    for _ in range(rounds)
                ]
                p99 = median([r.p99 for r in paced])
                results.add(
                    part,
                    f"GET /jobs/{{id}} at {CLIENTS} x 2 req/s, pool saturated (aiohttp), p50 / p99",
                    f"{median([r.p50 for r in paced]) * 1000:.1f} ms / {p99 * 1000:.1f} ms",
                    "<= 50 ms",
                    p99 <= 0.050,
                )
                states = [(await http.get(f"/jobs/{i}")).json()["state"] for i in ids]
                check(states.count("running") == 4, f"pool no longer saturated: {states}")
            finally:
                for job in ids:
                    await http.post(f"/jobs/{job}/cancel")
                for job in ids:
                    final = await http.get(f"/jobs/{job}", params={"wait": 30})
                    if final.json()["state"] != "cancelled":
                        raise BenchError(f"job {job} did not cancel: {final.text}")


def available_clients(choice: str) -> list[str]:
    """wrk when installed (the client that costs least), aiohttp beside it with "both"."""
    has_wrk = shutil.which("wrk") is not None
    if choice == "both":
        return ["wrk", "aiohttp"] if has_wrk else ["aiohttp"]
    if choice == "wrk" and not has_wrk:
        raise BenchError("wrk is not installed (apt-get install -y wrk)")
    if choice == "auto":
        return ["wrk"] if has_wrk else ["aiohttp"]
    return [choice]
