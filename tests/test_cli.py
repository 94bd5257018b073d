"""The `jobdock` client commands, run as real processes against a running service."""

import asyncio
import json
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.service import Service, free_port

pytestmark = pytest.mark.docker

SCRIPT = Path(sys.executable).with_name("jobdock")
# The installed console script when there is one, else the same entry point via -m.
JOBDOCK = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "app"]


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def _environ(url: str | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with JOBDOCK_URL set to `url` (unset if None), and `env`."""
    environ = {k: v for k, v in os.environ.items() if k != "JOBDOCK_URL"}
    if url is not None:
        environ["JOBDOCK_URL"] = url
    environ.update(env or {})
    return environ


async def jobdock(
    *args: str,
    url: str | None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Run:
    """Run `jobdock ARGS` with JOBDOCK_URL set to `url` (unset if None)."""
    process = await asyncio.create_subprocess_exec(
        *JOBDOCK,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_environ(url, env),
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(None if stdin is None else stdin.encode()), timeout
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def assert_clean_error(run: Run) -> None:
    """A failure that says what went wrong in a line or two, not a traceback."""
    assert run.code != 0, run
    assert "Traceback" not in run.stderr + run.stdout, run
    assert run.stderr.startswith("jobdock: "), run


async def test_submit_wait_prints_output_and_propagates_the_exit_code(
    service: Service, test_image: str
) -> None:
    run = await jobdock(
        "submit",
        "--wait",
        test_image,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
        url=service.url,
    )
    assert run.code == 3, run
    assert run.stdout == "out\n", run
    assert "err\n" in run.stderr, run
    assert "exit code 3" in run.stderr, run


async def test_submit_wait_succeeds_with_zero(service: Service, test_image: str) -> None:
    run = await jobdock(
        "submit",
        test_image,
        "--wait",
        "--env",
        "GREETING=hello",
        "--",
        "sh",
        "-c",
        'echo "$GREETING"',
        url=service.url,
    )
    assert run.code == 0, run
    assert run.stdout == "hello\n", run


async def test_submit_wait_exit_code_of_a_timed_out_job(service: Service, test_image: str) -> None:
    run = await jobdock(
        "submit", "--wait", "--timeout", "1", test_image, "--", "sleep", "30", url=service.url
    )
    assert run.code == 124, run
    assert "timed_out" in run.stderr, run


async def test_submit_prints_the_id_and_get_shows_the_job(
    service: Service, test_image: str
) -> None:
    run = await jobdock(
        "submit",
        "--label",
        "kind=cli",
        "--memory-mb",
        "64",
        "--cpu-shares",
        "256",
        test_image,
        "--",
        "echo",
        "hi",
        url=service.url,
    )
    assert run.code == 0, run
    job_id = run.stdout.strip()
    assert str(uuid.UUID(job_id)) == job_id, run

    await service.wait(job_id)
    shown = await jobdock("get", job_id, url=service.url)
    assert shown.code == 0, shown
    job = json.loads(shown.stdout)
    assert job["id"] == job_id
    assert job["state"] == "succeeded"
    assert job["stdout"] == "hi\n"
    assert job["labels"] == {"kind": "cli"}
    assert job["memory_mb"] == 64
    assert job["cpu_shares"] == 256


async def test_url_option_overrides_the_environment(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["true"])
    run = await jobdock("get", job["id"], "--url", service.url, url="http://127.0.0.1:9")
    assert run.code == 0, run
    assert json.loads(run.stdout)["id"] == job["id"]


async def test_ls_filters_by_label(service: Service, test_image: str) -> None:
    run_label = str(uuid.uuid4())
    ours = await service.submit(image=test_image, command=["true"], labels={"run": run_label})
    other = await service.submit(image=test_image, command=["true"], labels={"run": "other"})
    await service.wait(ours["id"])
    await service.wait(other["id"])

    table = await jobdock("ls", "--label", f"run={run_label}", url=service.url)
    assert table.code == 0, table
    assert ours["id"] in table.stdout, table
    assert other["id"] not in table.stdout, table
    header = table.stdout.splitlines()[0]
    assert "ID" in header and "STATE" in header, table
    assert "succeeded" in table.stdout, table

    quiet = await jobdock("ls", "-q", "--all", "--label", f"run={run_label}", url=service.url)
    assert quiet.code == 0, quiet
    assert quiet.stdout.split() == [ours["id"]], quiet

    none = await jobdock(
        "ls", "-q", "--state", "queued", "--label", f"run={run_label}", url=service.url
    )
    assert none.code == 0, none
    assert none.stdout == "", none


async def test_ls_all_follows_the_cursor(service: Service, test_image: str) -> None:
    run_label = str(uuid.uuid4())
    ids = {
        (await service.submit(image=test_image, command=["true"], labels={"run": run_label}))["id"]
        for _ in range(5)
    }
    one_page = await jobdock("ls", "-q", "--limit", "2", "-l", f"run={run_label}", url=service.url)
    assert one_page.code == 0, one_page
    assert len(one_page.stdout.split()) == 2, one_page
    assert "--all" in one_page.stderr, one_page

    every = await jobdock(
        "ls", "-q", "--all", "--limit", "2", "-l", f"run={run_label}", url=service.url
    )
    assert every.code == 0, every
    assert set(every.stdout.split()) == ids, every


async def test_logs_prints_the_output(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["sh", "-c", "echo out; echo err >&2"])
    assert job["state"] == "succeeded", job

    both = await jobdock("logs", job["id"], url=service.url)
    assert both.code == 0, both
    assert "out\n" in both.stdout and "err\n" in both.stdout, both

    only_err = await jobdock("logs", job["id"], "--stream", "stderr", url=service.url)
    assert only_err.code == 0, only_err
    assert only_err.stdout == "err\n", only_err


async def test_logs_follow_streams_until_the_job_ends(service: Service, test_image: str) -> None:
    job = await service.submit(
        image=test_image, command=["sh", "-c", "echo one; sleep 1; echo two >&2; echo three"]
    )
    run = await jobdock("logs", "-f", job["id"], url=service.url)
    assert run.code == 0, run
    assert run.stdout == "one\nthree\n", run
    assert run.stderr == "two\n", run


async def test_submit_follow_streams_and_propagates_the_exit_code(
    service: Service, test_image: str
) -> None:
    run = await jobdock(
        "submit",
        "--follow",
        test_image,
        "--",
        "sh",
        "-c",
        "echo start; sleep 1; echo oops >&2; exit 7",
        url=service.url,
    )
    assert run.code == 7, run
    assert run.stdout == "start\n", run
    assert "oops\n" in run.stderr, run


async def test_submit_reads_stdin_for_the_job(service: Service, test_image: str) -> None:
    run = await jobdock(
        "submit",
        "--wait",
        "--stdin-file",
        "-",
        test_image,
        "--",
        "cat",
        url=service.url,
        stdin="fed through\nstdin\n",
    )
    assert run.code == 0, run
    assert run.stdout == "fed through\nstdin\n", run


async def test_cancel_a_running_job(service: Service, test_image: str) -> None:
    job = await service.submit(image=test_image, command=["sh", "-c", "echo hi; sleep 30"])
    await service.wait(job["id"], states={"running"})

    run = await jobdock("cancel", job["id"], url=service.url)
    assert run.code == 0, run
    assert job["id"] in run.stdout, run
    started = time.monotonic()
    done = await service.wait(job["id"])
    assert done["state"] == "cancelled"
    assert time.monotonic() - started < 25

    again = await jobdock("cancel", job["id"], url=service.url)
    assert again.code == 1, again
    assert_clean_error(again)
    assert "finished" in again.stderr, again


async def test_submit_wait_of_a_cancelled_job_exits_130(service: Service, test_image: str) -> None:
    waiting = asyncio.create_task(
        jobdock(
            "submit",
            "--wait",
            "-l",
            "case=cancel-wait",
            test_image,
            "--",
            "sleep",
            "30",
            url=service.url,
        )
    )
    deadline = time.monotonic() + 60
    job_id = None
    while job_id is None:
        assert time.monotonic() < deadline, "the job was never submitted"
        await asyncio.sleep(0.2)
        page = (await service.client.get("/jobs", params={"state": "running"})).json()
        job_id = next(
            (j["id"] for j in page["items"] if j["labels"].get("case") == "cancel-wait"), None
        )
    assert (await service.client.post(f"/jobs/{job_id}/cancel")).status_code in (200, 202)
    run = await waiting
    assert run.code == 130, run
    assert "cancelled" in run.stderr, run


async def test_delete_a_finished_job(service: Service, test_image: str) -> None:
    job = await service.run(image=test_image, command=["true"])
    run = await jobdock("delete", job["id"], url=service.url)
    assert run.code == 0, run
    gone = await jobdock("get", job["id"], url=service.url)
    assert gone.code == 1, gone
    assert_clean_error(gone)

    missing = await jobdock("delete", str(uuid.uuid4()), url=service.url)
    assert missing.code == 1, missing
    assert_clean_error(missing)


async def test_unknown_job_prints_the_server_message(service: Service) -> None:
    run = await jobdock("get", str(uuid.uuid4()), url=service.url)
    assert run.code == 1, run
    assert_clean_error(run)
    assert "no job" in run.stderr.lower(), run


async def test_bad_image_prints_the_validation_message(service: Service) -> None:
    run = await jobdock("submit", "Not An Image", "--", "true", url=service.url)
    assert run.code == 1, run
    assert_clean_error(run)
    assert "image: image is not a valid Docker image reference" in run.stderr, run


async def test_limits_beyond_the_caps_print_the_message(service: Service, test_image: str) -> None:
    run = await jobdock("submit", "--memory-mb", "999999", test_image, url=service.url)
    assert run.code == 1, run
    assert_clean_error(run)
    assert "memory_mb" in run.stderr, run


async def test_unreachable_service_is_a_clear_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("ls",), ("get", str(uuid.uuid4())), ("submit", "busybox", "--wait")):
        run = await jobdock(*args, url=url)
        assert run.code == 69, run
        assert_clean_error(run)
        assert f"cannot reach Jobdock at {url}" in run.stderr, run


async def test_bad_command_lines_are_rejected_locally() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    bad_env = await jobdock("submit", "--env", "=x", "busybox", url=url)
    assert bad_env.code == 2, bad_env
    assert "Traceback" not in bad_env.stderr, bad_env

    bad_label = await jobdock("submit", "--label", "novalue", "busybox", url=url)
    assert bad_label.code == 2, bad_label
    assert "KEY=VALUE" in bad_label.stderr, bad_label

    bad_state = await jobdock("ls", "--state", "sleeping", url=url)
    assert bad_state.code == 2, bad_state

    bad_url = await jobdock("ls", url="not a url")
    assert bad_url.code in (2, 69), bad_url
    assert "Traceback" not in bad_url.stderr, bad_url


async def test_submit_wait_on_a_terminal_shows_the_state_as_it_changes(
    service: Service, test_image: str
) -> None:
    """On a terminal, `submit --wait` keeps a status line (rich's spinner) with the job's
    state and the time waited; the job's output still goes to stdout, untouched."""
    import pty

    controller, terminal = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        *JOBDOCK,
        "submit",
        "--wait",
        test_image,
        "--",
        "sh",
        "-c",
        "sleep 3; echo finished",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=terminal,
        env=_environ(service.url, {"TERM": "xterm-256color", "COLUMNS": "120"}),
    )
    os.close(terminal)
    seen = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the other end closed (EIO)
                return
            if not chunk:
                return
            seen.extend(chunk)

    reading = asyncio.get_running_loop().run_in_executor(None, read_terminal)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 120)
        await asyncio.wait_for(reading, 30)
    finally:
        os.close(controller)
    shown = seen.decode(errors="replace")
    assert process.returncode == 0, shown
    assert out.decode() == "finished\n", shown
    # The status line names the job and moves from its first state to running.
    assert re.search(r"job [0-9a-f-]{36}: (queued|running) \(\d+ s\)", shown), shown
    assert re.search(r"job [0-9a-f-]{36}: running \(\d+ s\)", shown), shown
