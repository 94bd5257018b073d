"""Structured logs: the JSON formatter, a real job's records through the worker pool, and a
real `jobdock serve` whose stderr is JSON lines only, uvicorn's own lines included."""

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import store
from app.db import SessionFactory
from app.logs import JsonFormatter
from app.models import JobCreate, JobState
from app.settings import Settings
from app.worker.service import start_pool
from tests.support.databases import database_url_for
from tests.support.service import free_port

pytestmark = pytest.mark.docker


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("app.worker.pool", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_record_is_one_line_of_json_with_its_extra_fields() -> None:
    line = JsonFormatter().format(
        record("job %s: %s", "abc", "succeeded", job_id="abc", worker_id="w-1", attempt=2)
    )
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed == {
        "ts": parsed["ts"],
        "level": "info",
        "logger": "app.worker.pool",
        "message": "job abc: succeeded",
        "job_id": "abc",
        "worker_id": "w-1",
        "attempt": 2,
    }
    assert parsed["ts"].endswith("Z")
    assert datetime.fromisoformat(parsed["ts"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_an_exception_is_one_string_field() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        failed = record("it failed", reason=object())
        failed.exc_info = sys.exc_info()
    parsed = json.loads(JsonFormatter().format(failed))
    assert parsed["message"] == "it failed"
    assert parsed["exc_info"].startswith("Traceback (most recent call last):")
    assert "ValueError: bad\nvalue" in parsed["exc_info"]
    # A value JSON cannot hold is written as its str(), never a failure to log.
    assert parsed["reason"].startswith("<object object")


async def test_a_real_job_logs_its_id_worker_and_attempt(
    settings: Settings,
    session_factory: SessionFactory,
    test_image: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app.worker.pool")
    async with session_factory() as session:
        job, _ = await store.create_job(
            session=session,
            job_in=JobCreate(image=test_image, command=["echo", "hi"]),
            settings=settings,
        )
    async with AsyncExitStack() as stack:
        pool = await start_pool(stack, settings.model_copy(update={"workers": 1}), session_factory)
        async with asyncio.timeout(60):
            while True:
                async with session_factory() as session:
                    done = await store.get_job(session=session, job_id=job.id)
                if done.state.is_terminal:
                    break
                await asyncio.sleep(0.05)
    assert done.state is JobState.succeeded
    mine = [r for r in caplog.records if getattr(r, "job_id", None) == str(job.id)]
    messages = [r.getMessage() for r in mine]
    assert any("starting" in m for m in messages), messages
    assert any("succeeded" in m for m in messages), messages
    for found in mine:
        parsed = json.loads(JsonFormatter().format(found))
        assert parsed["job_id"] == str(job.id)
        assert parsed["worker_id"] == pool.worker_id
        assert parsed["attempt"] == 1
        # The human message stays as it was.
        assert str(job.id) in parsed["message"]


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n--- stderr\n{text}")
        assert isinstance(parsed, dict), line
        assert {"ts", "level", "logger", "message"} <= set(parsed), line
        lines.append(parsed)
    return lines


async def test_serve_writes_only_json_lines_on_stderr(tmp_path: Path, test_image: str) -> None:
    port = free_port()
    stderr_path = tmp_path / "stderr.log"
    env = {
        **os.environ,
        "JOBDOCK_DATABASE_URL": await database_url_for(tmp_path),
        "JOBDOCK_LOG_FORMAT": "json",
        "JOBDOCK_WORKERS": "1",
        "JOBDOCK_POLL_INTERVAL_SECONDS": "0.5",
    }
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0) as client:
            deadline = time.monotonic() + 30
            while True:
                assert process.poll() is None, stderr_path.read_text()
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, stderr_path.read_text()
                await asyncio.sleep(0.1)
            submitted = await client.post("/jobs", json={"image": test_image, "command": ["true"]})
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            done = await client.get(f"/jobs/{job_id}", params={"wait": 30})
            assert done.json()["state"] == "succeeded"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)

    lines = json_lines(stderr_path.read_text())
    by_logger: dict[str, list[str]] = {}
    for line in lines:
        by_logger.setdefault(line["logger"], []).append(line["message"])
    assert any("Uvicorn running on" in m for m in by_logger["uvicorn.error"]), by_logger
    assert any("Application startup complete" in m for m in by_logger["uvicorn.error"])
    assert any("POST /jobs" in m for m in by_logger["uvicorn.access"]), by_logger
    assert any(" ready (database " in m for m in by_logger["app.main"])
    job_lines = [line for line in lines if line.get("job_id") == job_id]
    assert job_lines and all(line["attempt"] == 1 and line["worker_id"] for line in job_lines)
    assert "color_message" not in {key for line in lines for key in line}


async def test_text_format_for_humans(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        env={
            **os.environ,
            "JOBDOCK_DATABASE_URL": await database_url_for(tmp_path),
            "JOBDOCK_LOG_FORMAT": "text",
            "JOBDOCK_LOG_LEVEL": "INFO",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert " INFO alembic.runtime.migration: Running upgrade " in ran.stderr
    assert not ran.stderr.lstrip().startswith("{")
