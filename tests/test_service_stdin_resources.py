"""End to end: a job's stdin and its resource report through a real `jobdock serve`."""

import uuid

from tests.support.service import Service

# ~100 MB resident in the shell for 4 s, 2 s of it burning CPU (see the runner's tests).
MEMORY_AND_CPU = (
    "x=$(head -c 50000000 /dev/zero | tr '\\0' a); "
    "timeout 2 sh -c 'while :; do :; done'; "
    "sleep 2; echo ${#x}"
)


async def test_stdin_reaches_the_program_and_is_never_returned(
    service: Service, test_image: str
) -> None:
    text = "first line\nzweite Zeile — ✓ 🚀\nno newline at the end"
    job = await service.run(image=test_image, command=["cat"], stdin=text)
    assert job["state"] == "succeeded", job
    assert job["stdout"] == text
    assert "stdin" not in job
    listed = await service.client.get("/jobs", params={"image": test_image, "limit": 100})
    assert listed.status_code == 200
    assert all("stdin" not in item for item in listed.json()["items"])


async def test_one_mib_of_stdin_through_the_api(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["wc", "-c"], stdin="x" * 1024 * 1024)
    assert job["state"] == "succeeded", job
    assert job["stdout"].strip() == str(1024 * 1024)


async def test_unread_stdin_does_not_hold_up_the_job(service: Service, test_image: str) -> None:
    job = await service.run(
        image=test_image, command=["true"], stdin="x" * 1024 * 1024, timeout=30.0
    )
    assert job["state"] == "succeeded", job


async def test_without_stdin_the_program_reads_end_of_file(
    service: Service, test_image: str
) -> None:
    job = await service.run(image=test_image, command=["cat"], timeout=30.0)
    assert job["state"] == "succeeded", job
    assert job["stdout"] == ""


async def test_a_retried_job_reads_its_stdin_again(service: Service, test_image: str) -> None:
    # The second attempt's output is the stdout kept: it read the same input.
    job = await service.run(
        image=test_image,
        command=["sh", "-c", "cat; exit 3"],
        stdin="same input\n",
        max_attempts=2,
        retry_on_exit_codes=[3],
    )
    assert job["state"] == "failed", job
    assert job["attempt"] == 2
    assert job["stdout"] == "same input\n"
    assert job["resources"]["image_id"].startswith("sha256:")


async def test_resources_of_a_finished_job(service: Service, test_image: str) -> None:
    tag = uuid.uuid4().hex
    job = await service.run(
        image=test_image,
        command=["sh", "-c", MEMORY_AND_CPU],
        memory_mb=256,
        labels={"test": tag},
    )
    assert job["state"] == "succeeded", job
    report = job["resources"]
    assert set(report) == {
        "wall_seconds",
        "cpu_seconds",
        "peak_memory_bytes",
        "image_id",
        "image_digest",
    }
    assert 4.0 <= report["wall_seconds"] < 10.0
    assert report["cpu_seconds"] > 0.5
    assert report["peak_memory_bytes"] > 50_000_000
    assert report["image_id"].startswith("sha256:")
    # Built on this engine, never pulled from a registry: no digest.
    assert report["image_digest"] is None
    # The list shows the same report.
    listed = await service.client.get("/jobs", params={"label": f"test:{tag}"})
    assert listed.status_code == 200
    [item] = listed.json()["items"]
    assert item["resources"] == report


async def test_resources_of_a_job_that_timed_out(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["sleep", "600"], timeout_seconds=2)
    assert job["state"] == "timed_out", job
    report = job["resources"]
    assert 1.5 <= report["wall_seconds"] < 10.0
    assert report["image_id"].startswith("sha256:")
    # It ran 2 s: the engine sampled it.
    assert report["peak_memory_bytes"] > 0
    assert report["cpu_seconds"] is not None


async def test_queued_job_has_no_resources_yet(service: Service, test_image: str) -> None:
    job = await service.submit(image=test_image, command=["true"])
    assert job["resources"] is None
