"""End to end: a real `jobdock serve` process, a real Docker engine, a real SQLite file."""

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest

from app.settings import MIB
from tests.conftest import containers_left, job_containers
from tests.support.databases import server_url
from tests.support.service import Service, job_ids

# uvicorn shuts down cleanly, then re-raises the signal it caught.
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)

# Prints the job's cgroup CPU weight, memory limit and memory+swap limit (cgroup v1 or v2).
CGROUP_LIMITS = """
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  cat /sys/fs/cgroup/cpu.weight /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.swap.max
else
  cat /sys/fs/cgroup/cpu/cpu.shares /sys/fs/cgroup/memory/memory.limit_in_bytes
  cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || echo none
fi
"""


async def test_healthz_answers(service: Service) -> None:
    response = await service.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_success_with_stdout(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["sh", "-c", "echo hi"])
    assert job["state"] == "succeeded"
    assert job["exit_code"] == 0
    assert job["stdout"] == "hi\n"
    assert job["stderr"] == ""
    assert job["error"] is None
    assert job["attempt"] == 1
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]


async def test_default_command_of_the_image(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image)
    assert job["state"] == "succeeded"
    assert job["command"] is None
    assert job["stdout"] == "hello from the default command\n"


async def test_non_zero_exit_fails_without_error(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["sh", "-c", "exit 3"])
    assert job["state"] == "failed"
    assert job["exit_code"] == 3
    assert job["error"] is None


async def test_stderr_is_kept_apart_from_stdout(service: Service, test_image: str) -> None:
    script = "echo out1; echo err1 >&2; echo out2; echo err2 >&2"
    job = await service.run(image=test_image, command=["sh", "-c", script])
    assert job["stdout"] == "out1\nout2\n"
    assert job["stderr"] == "err1\nerr2\n"


async def test_env_and_working_dir_reach_the_process(service: Service, test_image: str) -> None:
    job = await service.run(
        image=test_image,
        command=["sh", "-c", 'echo "$GREETING|$SECOND"; pwd'],
        env={"GREETING": "hello world", "SECOND": "x=y"},
        working_dir="/srv/work",
    )
    assert job["state"] == "succeeded", job
    assert job["stdout"] == "hello world|x=y\n/srv/work\n"
    assert job["env"] == {"GREETING": "hello world", "SECOND": "x=y"}
    assert job["working_dir"] == "/srv/work"


async def test_cpu_shares_and_memory_limit_are_applied(service: Service, test_image: str) -> None:
    job = await service.run(
        image=test_image, command=["sh", "-c", CGROUP_LIMITS], cpu_shares=512, memory_mb=64
    )
    assert job["state"] == "succeeded", job
    cpu, memory, swap = job["stdout"].split()
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        assert int(cpu) == 1 + ((512 - 2) * 9999) // 262142  # runc's shares-to-weight
        assert int(memory) == 64 * MIB
        assert swap == "0"
    else:
        assert int(cpu) == 512
        assert int(memory) == 64 * MIB
        assert swap in ("none", str(64 * MIB))
    assert job["limits"] == {
        "cpu_shares": 512,
        "memory_bytes": 64 * MIB,
        "memory_swap_bytes": 64 * MIB,
        "pids_limit": 256,
        "timeout_seconds": 300,
        "output_limit_bytes": MIB,
        "network_mode": "none",
        "nano_cpus": 10**9,
        "read_only_rootfs": True,
        "user": "65534:65534",
    }


async def test_limits_are_recorded_while_running_or_with_a_short_jobs_result(
    service: Service, test_image: str
) -> None:
    # Over in less than the record delay: its container and limits come with its result.
    short = await service.run(image=test_image, command=["true"])
    assert short["state"] == "succeeded", short
    assert short["limits"] is not None and short["limits"]["network_mode"] == "none", short
    # Still running after it: recorded while it runs.
    long = await service.submit(image=test_image, command=["sleep", "30"])
    async with asyncio.timeout(30):
        while (running := await service.get(long["id"]))["limits"] is None:
            await asyncio.sleep(0.05)
    assert running["state"] == "running"
    assert running["limits"]["memory_bytes"] > 0
    await service.client.post(f"/jobs/{long['id']}/cancel")
    cancelled = await service.wait(long["id"], timeout=30)
    assert cancelled["limits"] == running["limits"], cancelled


async def test_job_has_no_network_but_loopback(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["sh", "-c", "cat /proc/net/dev"])
    interfaces = {line.split(":")[0].strip() for line in job["stdout"].splitlines()[2:]}
    assert interfaces == {"lo"}


async def test_timeout_kills_the_job(service: Service, test_image: str) -> None:
    job = await service.run(
        image=test_image, command=["sh", "-c", "echo started; sleep 60"], timeout_seconds=1
    )
    assert job["state"] == "timed_out"
    assert job["exit_code"] is None
    assert "timed out after 1 s" in job["error"]
    assert job["stdout"] == "started\n"


async def test_unknown_image_fails_naming_it(service: Service) -> None:
    job = await service.run(image="jobdock-no-such-image:1.0", command=["true"])
    assert job["state"] == "failed"
    assert "jobdock-no-such-image:1.0" in job["error"]
    assert job["exit_code"] is None


async def test_out_of_memory_fails_with_the_limit(service: Service, test_image: str) -> None:
    hog = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"
    job = await service.run(image=test_image, command=["sh", "-c", hog], memory_mb=16)
    assert job["state"] == "failed"
    assert "out of memory" in job["error"]
    assert "16 MiB" in job["error"]
    assert "survived" not in job["stdout"]


async def test_huge_output_is_capped_and_memory_stays_flat(
    service: Service, test_image: str
) -> None:
    baseline = service.rss_bytes()
    submitted = await service.submit(
        image=test_image,
        command=["sh", "-c", "head -c 52428800 /dev/zero | tr '\\0' x; echo done >&2"],
    )
    peak = baseline
    job = await service.get(submitted["id"])
    while job["state"] in ("queued", "running"):
        peak = max(peak, service.rss_bytes())
        await asyncio.sleep(0.05)
        job = await service.get(submitted["id"])
    assert job["state"] == "succeeded", job
    assert job["output_truncated"] is True
    assert len(job["stdout"].encode()) == MIB
    assert set(job["stdout"]) == {"x"}
    assert job["stderr"] == "done\n"
    # Holding the whole 50 MB, even once, would show here; the cap keeps growth small.
    assert peak - baseline < 32 * MIB, f"service grew by {(peak - baseline) / MIB:.1f} MiB"


async def test_twenty_jobs_at_once_all_finish_and_leave_no_container(
    service: Service, test_image: str, docker: aiodocker.Docker
) -> None:
    submitted = await asyncio.gather(
        *(
            service.submit(image=test_image, command=["sh", "-c", f"echo job {n}"])
            for n in range(20)
        )
    )
    finished = await asyncio.gather(*(service.wait(job["id"]) for job in submitted))
    for n, job in enumerate(finished):
        assert job["state"] == "succeeded", job
        assert job["stdout"] == f"job {n}\n"
        assert job["attempt"] == 1
    assert await containers_left(docker, job_ids(*finished)) == []


@pytest.fixture(scope="module")
async def one_worker(
    tmp_path_factory: pytest.TempPathFactory, test_image: str
) -> AsyncIterator[Service]:
    async with Service(
        tmp_path_factory.mktemp("one-worker"), workers=1, heartbeat_interval_seconds=1
    ) as svc:
        yield svc


async def test_cancel_queued_and_running_jobs(
    one_worker: Service, test_image: str, docker: aiodocker.Docker
) -> None:
    running = await one_worker.submit(image=test_image, command=["sh", "-c", "echo up; sleep 60"])
    queued = await one_worker.submit(image=test_image, command=["echo", "never"])
    await one_worker.wait(running["id"], states={"running"})

    response = await one_worker.client.post(f"/jobs/{queued['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"

    response = await one_worker.client.post(f"/jobs/{running['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    job = await one_worker.wait(running["id"], timeout=30)
    assert job["state"] == "cancelled"
    assert job["error"] == "cancelled while running"

    assert (await one_worker.get(queued["id"]))["started_at"] is None
    response = await one_worker.client.post(f"/jobs/{running['id']}/cancel")
    assert response.status_code == 409
    assert "cancelled" in response.json()["detail"]
    assert await containers_left(docker, job_ids(running, queued)) == []


async def test_jobs_wait_while_the_engine_is_unreachable_and_the_service_keeps_serving(
    tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, docker_host=f"unix://{tmp_path}/no-engine.sock") as svc:
        job = await svc.submit(image=test_image, command=["true"])
        async with asyncio.timeout(60):
            while "back in the queue, the engine cannot be reached" not in svc.log():
                await asyncio.sleep(0.05)
        waiting = await svc.get(job["id"])
        assert (waiting["state"], waiting["attempt"], waiting["error"]) == ("queued", 0, None)
        assert (await svc.client.get("/healthz")).status_code == 200
        assert (await svc.client.get("/jobs")).status_code == 200
        assert (await svc.submit(image=test_image))["state"] == "queued"


async def test_restart_keeps_jobs(tmp_path: Path, test_image: str) -> None:
    async with Service(tmp_path, workers=1) as first:
        done = await first.run(image=test_image, command=["sh", "-c", "echo kept"])
    async with Service(tmp_path, workers=0) as idle:
        waiting = await idle.submit(image=test_image, command=["sh", "-c", "echo later"])
    async with Service(tmp_path, workers=1) as second:
        assert await second.get(done["id"]) == done
        job = await second.wait(waiting["id"])
        assert job["state"] == "succeeded"
        assert job["stdout"] == "later\n"


async def test_sigterm_lets_running_jobs_finish_within_grace(
    tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, workers=2, shutdown_grace_seconds=30) as svc:
        job = await svc.submit(image=test_image, command=["sh", "-c", "sleep 2; echo finished"])
        await svc.wait(job["id"], states={"running"})
        assert await svc.stop(signal.SIGTERM) in STOPPED_BY_SIGTERM
    async with Service(tmp_path, workers=0) as again:
        finished = await again.get(job["id"])
        assert finished["state"] == "succeeded"
        assert finished["stdout"] == "finished\n"


async def test_sigterm_leaves_jobs_past_the_grace_for_re_attach(
    tmp_path: Path, test_image: str, docker: aiodocker.Docker
) -> None:
    async with Service(tmp_path, workers=1, shutdown_grace_seconds=1) as svc:
        job = await svc.submit(image=test_image, command=["sh", "-c", "sleep 4; echo survived"])
        queued = await svc.submit(image=test_image, command=["echo", "not yet"])
        await svc.wait(job["id"], states={"running"})
        async with asyncio.timeout(60):
            while not await job_containers(docker, job_ids(job)):
                await asyncio.sleep(0.05)
        assert await svc.stop(signal.SIGTERM, timeout=30) in STOPPED_BY_SIGTERM
    # The container outlived the service; nothing new was claimed after SIGTERM.
    assert len(await job_containers(docker, job_ids(job))) == 1
    async with Service(tmp_path, workers=0) as idle:
        assert (await idle.get(job["id"]))["state"] == "running"
        assert (await idle.get(queued["id"]))["state"] == "queued"
    async with Service(tmp_path, workers=1) as again:
        finished = await again.wait(job["id"], timeout=60)
        assert finished["state"] == "succeeded"
        assert finished["stdout"] == "survived\n"
        assert finished["attempt"] == 1
        assert (await again.wait(queued["id"]))["stdout"] == "not yet\n"
    assert await containers_left(docker, job_ids(job, queued)) == []


async def test_kill_9_then_restart_reattaches_running_jobs(
    tmp_path: Path, test_image: str, docker: aiodocker.Docker
) -> None:
    async with Service(tmp_path, workers=5) as svc:
        jobs = [
            await svc.submit(
                image=test_image, command=["sh", "-c", f"hostname; sleep 3; echo job {n}"]
            )
            for n in range(5)
        ]
        ids = job_ids(*jobs)
        for job in jobs:
            await svc.wait(job["id"], states={"running"})
        async with asyncio.timeout(60):
            while len(await job_containers(docker, ids)) < 5:
                await asyncio.sleep(0.05)
        await svc.stop(signal.SIGKILL)
    containers = {c[:12] for c in await job_containers(docker, ids)}
    assert len(containers) == 5

    async with Service(tmp_path, workers=5) as again:
        finished = [await again.wait(job["id"], timeout=60) for job in jobs]
    for n, job in enumerate(finished):
        assert job["state"] == "succeeded", job
        assert job["attempt"] == 1
        hostname, output = job["stdout"].splitlines()
        # The same container ran to its end: it was not created again.
        assert hostname in containers
        assert output == f"job {n}"
    assert len({job["stdout"].split()[0] for job in finished}) == 5
    assert await containers_left(docker, ids) == []


async def test_container_removed_from_outside_fails_the_job(
    service: Service, test_image: str, docker: aiodocker.Docker
) -> None:
    job = await service.submit(image=test_image, command=["sleep", "60"])
    await service.wait(job["id"], states={"running"})
    async with asyncio.timeout(60):
        while not (containers := await job_containers(docker, job_ids(job))):
            await asyncio.sleep(0.05)
    await docker.containers.container(containers[0]).delete(force=True)
    failed = await service.wait(job["id"], timeout=30)
    assert failed["state"] == "failed"
    assert "container disappeared" in failed["error"]


async def test_api_only_node_and_a_separate_worker_share_the_database(
    tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, command=["serve", "--no-workers"]) as api:
        job = await api.submit(image=test_image, command=["sh", "-c", "echo from the worker"])
        assert (await api.get(job["id"]))["state"] == "queued"
        async with Service(tmp_path, command=["worker"], workers=2) as worker:
            done = await api.wait(job["id"])
            assert await worker.stop(signal.SIGTERM) in STOPPED_BY_SIGTERM
        assert done["state"] == "succeeded"
        assert done["stdout"] == "from the worker\n"
        assert "worker " in worker.log() and " stopping" in worker.log()


@pytest.mark.skipif(server_url() is None, reason="LISTEN/NOTIFY needs PostgreSQL")
async def test_a_submission_on_another_node_wakes_an_idle_worker(
    tmp_path: Path, test_image: str
) -> None:
    # The worker polls once an hour: only a NOTIFY can get these jobs run in time.
    async with (
        Service(tmp_path, command=["serve", "--no-workers"]) as api,
        Service(tmp_path, command=["worker"], workers=1, poll_interval_seconds=3600) as _,
    ):
        for n in range(3):
            job = await api.submit(image=test_image, command=["echo", f"woken {n}"])
            done = await api.wait(job["id"], timeout=60)
            assert done["state"] == "succeeded"
            assert done["stdout"] == f"woken {n}\n"


async def test_failed_attempts_are_retried_and_recorded(tmp_path: Path, test_image: str) -> None:
    async with Service(tmp_path, workers=2, retry_backoff_seconds=0.2) as svc:
        retried, not_listed = await asyncio.gather(
            svc.run(image=test_image, command=["sh", "-c", "echo try; exit 3"], max_attempts=3),
            svc.run(
                image=test_image,
                command=["sh", "-c", "exit 3"],
                max_attempts=3,
                retry_on_exit_codes=[75],
            ),
        )
    assert retried["state"] == "failed"
    assert (retried["attempt"], retried["exit_code"], retried["stdout"]) == (3, 3, "try\n")
    assert [(a["attempt"], a["state"], a["exit_code"]) for a in retried["attempts"]] == [
        (1, "failed", 3),
        (2, "failed", 3),
    ]
    # Exit 3 is not among the codes to retry on: one attempt only.
    assert (not_listed["state"], not_listed["attempt"], not_listed["attempts"]) == (
        "failed",
        1,
        [],
    )


async def test_higher_priority_runs_first_then_oldest_first(
    tmp_path: Path, test_image: str
) -> None:
    async with Service(tmp_path, workers=0) as idle:
        jobs = [
            await idle.submit(image=test_image, command=["true"], priority=priority)
            for priority in (0, -5, 50, 0, 100)
        ]
    async with Service(tmp_path, workers=1) as one:
        finished = [await one.wait(job["id"]) for job in jobs]
    by_start = sorted(finished, key=lambda job: job["started_at"])
    assert [job["id"] for job in by_start] == [
        jobs[4]["id"],
        jobs[2]["id"],
        jobs[0]["id"],
        jobs[3]["id"],
        jobs[1]["id"],
    ]
