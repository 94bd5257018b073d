"""Operator limits and container hardening through HTTP: a real service, a real engine.

The container-level escape attempts (fork bomb, symlinks, network, ulimits) run on the
runner in tests/worker/test_hardening.py; here the same defaults are seen end to end.
"""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from app.settings import Settings
from tests.support.service import Service

ALLOWED = "jobdock-test-*, registry.local/*"


@pytest.fixture(scope="module")
async def guarded(
    tmp_path_factory: pytest.TempPathFactory, test_image: str
) -> AsyncIterator[Service]:
    async with Service(
        tmp_path_factory.mktemp("escapes"),
        workers=2,
        allowed_images=ALLOWED,
        max_memory_mb=512,
        max_timeout_seconds=600,
        max_cpus=1.0,
    ) as svc:
        yield svc


def only_error(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert len(errors) == 1, errors
    error: dict[str, Any] = errors[0]
    return error


async def test_an_image_outside_the_allowed_patterns_answers_422(guarded: Service) -> None:
    error = only_error(await guarded.client.post("/jobs", json={"image": "busybox:latest"}))
    assert error["loc"] == ["body", "image"]
    assert "jobdock-test-*" in error["msg"] and "registry.local/*" in error["msg"]
    # A pattern matches the whole reference, case-sensitively.
    for image in ("docker.io/jobdock-test-x", "registry.local.evil/x"):
        assert (await guarded.client.post("/jobs", json={"image": image})).status_code == 422
    batch = {"jobs": [{"image": "jobdock-test-a"}, {"image": "evil/image"}]}
    error = only_error(await guarded.client.post("/jobs/batch", json=batch))
    assert error["loc"] == ["body", "jobs", 1, "image"]


async def test_each_cap_answers_422_naming_it(guarded: Service, test_image: str) -> None:
    cases = {
        "memory_mb": (513, "memory_mb may be at most 512"),
        "timeout_seconds": (601, "timeout_seconds may be at most 600"),
        "cpus": (1.5, "cpus may be at most 1 on this service"),
    }
    for field, (value, message) in cases.items():
        error = only_error(
            await guarded.client.post("/jobs", json={"image": test_image, field: value})
        )
        assert error["loc"] == ["body", field]
        assert message in error["msg"]


@pytest.mark.parametrize(
    "field",
    [
        "privileged",
        "binds",
        "volumes",
        "mounts",
        "devices",
        "cap_add",
        "network_mode",
        "pid_mode",
        "ipc_mode",
        "userns_mode",
        "user",
        "security_opt",
        "read_only",
        "host_config",
    ],
)
async def test_no_field_can_ask_for_more_privilege(
    guarded: Service, test_image: str, field: str
) -> None:
    response = await guarded.client.post("/jobs", json={"image": test_image, field: True})
    error = only_error(response)
    assert error["type"] == "extra_forbidden"
    assert error["loc"] == ["body", field]


async def test_a_job_runs_unprivileged_on_a_read_only_root(
    guarded: Service, test_image: str
) -> None:
    script = "id; echo x > /etc/x; echo etc=$?; echo y > /tmp/y && cat /tmp/y"
    job = await guarded.run(image=test_image, command=["sh", "-c", script])
    assert job["state"] == "succeeded", job
    lines = job["stdout"].splitlines()
    assert lines[0].startswith("uid=65534 gid=65534")
    assert lines[1:] == ["etc=1", "y"]
    assert "Read-only file system" in job["stderr"]
    limits = job["limits"]
    assert limits["user"] == "65534:65534"
    assert limits["read_only_rootfs"] is True
    assert limits["nano_cpus"] == 10**9
    assert limits["network_mode"] == "none"


async def test_cpus_is_stored_and_applied(guarded: Service, test_image: str) -> None:
    job = await guarded.run(image=test_image, command=["true"], cpus=0.25)
    assert job["state"] == "succeeded", job
    assert job["cpus"] == 0.25
    assert job["limits"]["nano_cpus"] == 25 * 10**7
    default = await guarded.submit(image=test_image, command=["true"])
    assert default["cpus"] == 1.0  # default_cpus, filled in at submission
    assert (await guarded.wait(default["id"]))["limits"]["nano_cpus"] == 10**9
    assert (
        await guarded.client.post("/jobs", json={"image": test_image, "cpus": 0})
    ).status_code == 422


def test_allowed_lists_read_json_or_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBDOCK_ALLOWED_IMAGES", " registry.local/*, busybox:* ")
    assert Settings().allowed_images == ["registry.local/*", "busybox:*"]
    monkeypatch.setenv("JOBDOCK_ALLOWED_IMAGES", '["a/*", "b"]')
    assert Settings().allowed_images == ["a/*", "b"]
    monkeypatch.delenv("JOBDOCK_ALLOWED_IMAGES")
    assert Settings().allowed_images == ["*"]
    assert Settings().allowed_networks == ["none"]


@pytest.mark.parametrize(
    "settings",
    [
        {"allowed_networks": "host"},
        {"allowed_networks": "none,container:abc"},
        {"allowed_images": ""},
        {"default_cpus": 2.0, "max_cpus": 1.0},
        {"tmp_size_mb": 0},
        {"job_user": ""},
    ],
)
def test_settings_refuse_what_would_open_the_host(settings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(**settings)
