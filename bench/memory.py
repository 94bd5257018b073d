"""Part 3: the service's peak RSS (psutil on its pid, sampled every 50 ms).

(i) while 4 jobs at once each print S MB (S = 20, then 200 by default: flat as output
    grows means the peak does not follow S); every job's stdout is checked to be exactly
    the first JOBDOCK_OUTPUT_LIMIT_BYTES of what it printed, and truncated;
(ii) while 10,000 finished jobs (4 KiB of stdout each) are in the database and clients page
    through all of them with `GET /jobs?limit=100`: once alone, three times over, then 8
    clients at once; each pass must see every job exactly once.
"""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from app.db import create_engine, create_session_factory, upgrade_to_head
from app.models import Job, JobState
from bench.common import (
    MIB,
    Database,
    Results,
    RssSampler,
    check,
    running_service,
)
from tests.support.service import Service

OUTPUT_LIMIT = MIB
TARGET = 150 * MIB


async def printing_jobs(service: Service, image: str, megabytes: int, jobs: int) -> int:
    """Peak RSS while `jobs` jobs each print `megabytes` MB; outputs checked."""
    assert service.process is not None
    async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
        with RssSampler(service.process.pid) as sampler:
            ids = []
            for _ in range(jobs):
                response = await client.post(
                    "/jobs",
                    json={
                        "image": image,
                        "command": [
                            "sh",
                            "-c",
                            f"head -c {megabytes * MIB} /dev/zero | tr '\\0' x",
                        ],
                        "timeout_seconds": 600,
                    },
                )
                check(response.status_code == 202, response.text)
                ids.append(response.json()["id"])
            for job_id in ids:
                while True:
                    job = (await client.get(f"/jobs/{job_id}", params={"wait": 30})).json()
                    if job["state"] not in ("queued", "running"):
                        break
                check(
                    job["state"] == "succeeded"
                    and job["output_truncated"] is True
                    and job["stdout"] == "x" * OUTPUT_LIMIT,
                    f"job printing {megabytes} MB ended {job['state']} {job.get('error')!r}, "
                    f"truncated={job['output_truncated']}, {len(job['stdout'])} chars kept",
                )
    return sampler.peak


async def fill_database(url: str, count: int) -> None:
    """`count` finished jobs, written straight through the models before the service starts."""
    engine = create_engine(url)
    try:
        await upgrade_to_head(engine)
        sessions = create_session_factory(engine)
        start = datetime.now(UTC) - timedelta(hours=1)
        batch = 1000
        for offset in range(0, count, batch):
            async with sessions() as session:
                jobs = []
                for index in range(offset, min(count, offset + batch)):
                    created = start + timedelta(milliseconds=index * 10)
                    jobs.append(
                        Job(
                            id=uuid.uuid4(),
                            image="jobdock-test-busybox:latest",
                            command=["sh", "-c", f"echo job {index}"],
                            labels={"bench": "memory", "index": str(index)},
                            cpu_shares=1024,
                            memory_mb=256,
                            timeout_seconds=60,
                            state=JobState.succeeded,
                            attempt=1,
                            exit_code=0,
                            stdout=("x" * 63 + "\n") * 64,
                            created_at=created,
                            run_after=created,
                            started_at=created,
                            finished_at=created + timedelta(milliseconds=5),
                        )
                    )
                session.add_all(jobs)
                await session.commit()
    finally:
        await engine.dispose()


async def page_all(client: httpx.AsyncClient, expected: int) -> None:
    seen: set[str] = set()
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 100}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get("/jobs", params=params)
        check(response.status_code == 200, f"GET /jobs: {response.status_code}")
        page = response.json()
        for item in page["items"]:
            check(item["id"] not in seen, f"job {item['id']} listed twice")
            check("stdout" not in item, "list items carry stdout")
            seen.add(item["id"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    check(len(seen) == expected, f"paging saw {len(seen)} jobs, not {expected}")


async def run(
    results: Results,
    *,
    image: str,
    workdir: Path,
    database: Database,
    sizes: list[int],
    finished_jobs: int,
) -> None:
    part = "3 memory"
    async with running_service(
        workdir, database, workers=4, output_limit_bytes=OUTPUT_LIMIT
    ) as service:
        assert service.process is not None
        idle = service.rss_bytes()
        results.add(part, "service RSS idle, 4 workers", f"{idle / MIB:.0f} MiB")
        peaks = {}
        for megabytes in sizes:
            peaks[megabytes] = await printing_jobs(service, image, megabytes, 4)
            results.add(
                part,
                f"peak RSS while 4 jobs each print {megabytes} MB",
                f"{peaks[megabytes] / MIB:.0f} MiB",
                "< 150 MB",
                peaks[megabytes] < TARGET,
            )
        if len(sizes) > 1:
            growth = peaks[sizes[-1]] - peaks[sizes[0]]
            results.add(
                part,
                f"peak growth from {sizes[0]} MB to {sizes[-1]} MB per job",
                f"{growth / MIB:+.0f} MiB",
                "flat",
                growth < 10 * MIB,
            )

    url = await database.fresh_url(workdir)
    await fill_database(url, finished_jobs)
    async with running_service(workdir, database, workers=4, database_url=url) as service:
        assert service.process is not None
        idle = service.rss_bytes()
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
            with RssSampler(service.process.pid) as alone:
                for _ in range(3):
                    await page_all(client, finished_jobs)
            with RssSampler(service.process.pid) as crowd:
                await asyncio.gather(*(page_all(client, finished_jobs) for _ in range(8)))
        results.add(
            part, f"service RSS idle, {finished_jobs} finished jobs stored", f"{idle / MIB:.0f} MiB"
        )
        for label, sampler in (("1 client, 3 passes", alone), ("8 clients at once", crowd)):
            results.add(
                part,
                f"peak RSS paging through {finished_jobs} jobs, {label}",
                f"{sampler.peak / MIB:.0f} MiB",
                "< 150 MB",
                sampler.peak < TARGET,
            )
