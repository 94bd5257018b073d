"""Container hardening and escape attempts, on the real Docker engine through the runner.

Each test reads what the engine and the kernel actually did: `docker inspect` of the
created container (taken in on_created, before the runner removes it), the job's own
view from inside, and for the fork bomb the container's pids cgroup as seen from the host.
"""

import asyncio
import json
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiodocker.exceptions import DockerError

from app.settings import MIB, Settings
from app.worker.runner import ContainerRunner, StopReason
from tests.worker.test_runner import (
    CreatedRecorder,
    Harness,
    assert_removed,
    run,
    runner_harness,
)

PIDS_LIMIT = 64
NOFILE = 64
FSIZE_MB = 1
TMP_SIZE_MB = 8
APP = Path(__file__).resolve().parents[2] / "app"


@pytest.fixture
async def hardened(docker: aiodocker.Docker, test_image: str) -> AsyncIterator[Harness]:
    """The runner with the default hardening, tighter ulimits so they are cheap to hit."""
    settings = Settings(
        output_limit_bytes=256 * 1024,
        pids_limit=PIDS_LIMIT,
        ulimit_nofile=NOFILE,
        ulimit_fsize_mb=FSIZE_MB,
        tmp_size_mb=TMP_SIZE_MB,
        engine_call_timeout_seconds=30.0,
    )
    async with runner_harness(docker, test_image, settings, "test-hardening") as made:
        yield made


def _never_widened(inspect: dict[str, Any]) -> None:
    """What no job container may ever have, whatever the settings."""
    host = inspect["HostConfig"]
    assert host["Privileged"] is False
    assert not host.get("Binds")
    assert not host.get("Mounts")
    assert not host.get("Devices")
    assert not host.get("VolumesFrom")
    assert not host.get("CapAdd")
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in (host.get("SecurityOpt") or [])
    assert host["NetworkMode"] == "none"
    assert inspect["NetworkSettings"]["Networks"].keys() <= {"none"}
    # NetworkDisabled as well: the engine then builds no network sandbox at all, which
    # halves the engine's cost of a short job (bench/README.md, "Engine options").
    assert inspect["Config"].get("NetworkDisabled") is True
    assert not inspect["NetworkSettings"].get("SandboxKey")
    # Empty means a private namespace; "host" or "container:..." would share one.
    for mode in ("PidMode", "UTSMode", "UsernsMode", "CgroupnsMode"):
        assert host.get(mode, "") in ("", "private"), (mode, host.get(mode))
    assert host["IpcMode"] == "private"
    # No mount of any kind from the host, the Docker socket least of all.
    assert inspect["Mounts"] == []
    assert "docker.sock" not in json.dumps(inspect)
    # Docker's default masking of /proc and /sys stays.
    assert "/proc/kcore" in (host.get("MaskedPaths") or [])
    assert "/proc/sys" in (host.get("ReadonlyPaths") or [])


async def test_inspect_shows_nothing_that_widens_the_container(hardened: Harness) -> None:
    spec = hardened.spec("true")
    result, created = await run(hardened, spec)
    assert result.exit_code == 0, result.stderr
    _never_widened(created.inspect)

    host = created.inspect["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["Tmpfs"] == {
        "/tmp": f"rw,exec,nosuid,nodev,size={TMP_SIZE_MB}m,mode=1777,uid=65534,gid=65534"
    }
    assert host["NanoCpus"] == 10**9
    assert host["PidsLimit"] == PIDS_LIMIT
    assert sorted(host["Ulimits"], key=lambda u: u["Name"]) == [
        {"Name": "fsize", "Soft": FSIZE_MB * MIB, "Hard": FSIZE_MB * MIB},
        {"Name": "nofile", "Soft": NOFILE, "Hard": NOFILE},
    ]
    assert created.inspect["Config"]["User"] == "65534:65534"
    assert result.limits.nano_cpus == 10**9
    assert result.limits.read_only_rootfs is True
    assert result.limits.user == "65534:65534"
    await assert_removed(hardened.docker, spec, created.container_id)


async def test_the_api_has_no_field_that_can_widen_a_container() -> None:
    from app.models import JobCreate

    fields = set(JobCreate.model_fields)
    forbidden = re.compile(
        r"privileg|bind|volume|mount|device|cap_|capab|network|pid_mode|ipc|uts|userns|"
        r"user|host|security|sysctl|ulimit|read_only|tmpfs|runtime|cgroup",
        re.IGNORECASE,
    )
    assert not [name for name in fields if forbidden.search(name)]
    assert JobCreate.model_config.get("extra") == "forbid"


CPU_QUOTA = """
if [ -f /sys/fs/cgroup/cpu.max ]; then cat /sys/fs/cgroup/cpu.max
else cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us; fi
"""


async def test_cpus_is_a_hard_cap_in_the_cgroup(hardened: Harness) -> None:
    spec = hardened.spec(CPU_QUOTA, cpus=0.5)
    result, created = await run(hardened, spec)
    assert result.exit_code == 0, result.stderr
    quota, period = result.stdout.split()
    assert int(quota) / int(period) == 0.5
    assert created.inspect["HostConfig"]["NanoCpus"] == 5 * 10**8
    assert result.limits.nano_cpus == 5 * 10**8
    await assert_removed(hardened.docker, spec, created.container_id)


async def test_job_runs_as_the_unprivileged_user(hardened: Harness) -> None:
    spec = hardened.spec("id; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs):' /proc/self/status")
    result, created = await run(hardened, spec)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("uid=65534 gid=65534")
    status = dict(line.split(":\t") for line in lines[1:])
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    await assert_removed(hardened.docker, spec, created.container_id)


async def test_image_user_is_used_only_when_the_operator_allows_it(
    docker: aiodocker.Docker, test_image: str
) -> None:
    settings = Settings(allow_image_user=True, engine_call_timeout_seconds=30.0)
    worker_id = f"test-hardening-{uuid.uuid4().hex[:12]}"
    harness = Harness(
        docker, test_image, settings, worker_id, ContainerRunner(docker, settings, worker_id)
    )
    spec = harness.spec("id -u")
    result, created = await run(harness, spec)
    # The test image declares no USER: the image's own user is root, capless all the same.
    assert result.stdout == "0\n"
    assert result.limits.user == ""
    _never_widened(created.inspect)
    await assert_removed(docker, spec, created.container_id)


async def test_root_filesystem_is_read_only_but_tmp_is_writable(hardened: Harness) -> None:
    script = (
        "echo x > /etc/escape; echo etc=$?; touch /escape; echo root=$?; "
        "echo kept > /tmp/ok && cat /tmp/ok; grep ' /tmp ' /proc/mounts"
    )
    spec = hardened.spec(script)
    result, created = await run(hardened, spec)
    assert result.exit_code == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[:3] == ["etc=1", "root=1", "kept"]
    assert "Read-only file system" in result.stderr
    options = out[3].split()[3].split(",")
    assert {"rw", "nosuid", "nodev", f"size={TMP_SIZE_MB * 1024}k"} <= set(options)
    await assert_removed(hardened.docker, spec, created.container_id)


async def test_tmp_is_writable_as_the_working_dir_and_runs_scripts(hardened: Harness) -> None:
    # runc resets /tmp's mode when it is the working dir: the job user owns it instead.
    script = "printf '#!/bin/sh\\necho ran\\n' > s.sh && chmod +x s.sh && ./s.sh; pwd"
    spec = hardened.spec(script, working_dir="/tmp")
    result, created = await run(hardened, spec)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "ran\n/tmp\n"
    await assert_removed(hardened.docker, spec, created.container_id)


async def test_file_size_ulimit_stops_a_big_file(hardened: Harness) -> None:
    spec = hardened.spec(
        f"head -c {2 * FSIZE_MB * MIB} /dev/zero > /tmp/big; echo rc=$?; wc -c < /tmp/big"
    )
    result, created = await run(hardened, spec)
    assert result.exit_code == 0, result.stderr
    # SIGXFSZ: 128 + 25; the file stops at the cap.
    assert result.stdout.split() == ["rc=153", str(FSIZE_MB * MIB)]
    await assert_removed(hardened.docker, spec, created.container_id)


async def test_open_files_ulimit_cannot_be_passed_or_raised(hardened: Harness) -> None:
    script = (
        f"for i in $(seq {NOFILE + 20}); do : > /tmp/f$i; done; "
        "tail -n 0 /tmp/f* 2>&1 | grep -c 'Too many open files'; "
        "ulimit -n; ulimit -n 100000 2>/dev/null; echo raise=$?"
    )
    spec = hardened.spec(script)
    result, created = await run(hardened, spec)
    refused, soft, raised = result.stdout.split()
    assert int(refused) > 0
    assert soft == str(NOFILE)
    assert raised != "raise=0"
    await assert_removed(hardened.docker, spec, created.container_id)


def _pids_cgroup(pid: int) -> Path | None:
    """The pids cgroup directory of a host process (cgroup v1 or v2)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/")
        if controllers == "":
            return Path("/sys/fs/cgroup") / path.lstrip("/")
    return None


async def test_fork_bomb_is_held_by_the_pids_limit(hardened: Harness) -> None:
    # Each process forks two more, then holds its pid (exec needs no fork): the count
    # grows until the kernel refuses forks, and stays there until the timeout.
    bomb = hardened.spec("bomb(){ bomb | bomb & exec sleep 60; }; bomb", timeout_seconds=6)
    recorder = CreatedRecorder(hardened.docker)
    task = asyncio.create_task(run(hardened, bomb, recorder=recorder))
    samples: list[int] = []
    refused = 0
    host_checked = False
    try:
        async with asyncio.timeout(30.0):
            await recorder.created.wait()
        assert recorder.container_id is not None
        container = hardened.docker.containers.container(recorder.container_id)
        cgroup: Path | None = None
        while not task.done():
            try:
                info = await container.show()
            except DockerError as exc:
                # The runner removes the container just before its run returns.
                assert exc.status == 404
                break
            if cgroup is None and info["State"]["Pid"]:
                cgroup = _pids_cgroup(info["State"]["Pid"])
            if cgroup is not None:
                try:
                    samples.append(int((cgroup / "pids.current").read_text()))
                    events = (cgroup / "pids.events").read_text().split()
                    refused = max(refused, int(events[events.index("max") + 1]))
                except (OSError, ValueError):
                    pass
            if len(samples) >= 10 and not host_checked:
                host_checked = True
                # The bomb is raging: the host and the engine still serve other work.
                alive = hardened.spec("echo alive")
                other, _ = await run(hardened, alive)
                assert other.stdout == "alive\n"
                assert (await hardened.docker.version())["Version"]
                assert subprocess.run(["true"], check=False, timeout=10).returncode == 0
            await asyncio.sleep(0.05)
        result, _ = await task
    finally:
        task.cancel()
    assert result.stop_reason is StopReason.timed_out
    assert "can't fork" in result.stderr
    if not samples:
        pytest.skip("the container's pids cgroup cannot be read from this host")
    assert max(samples) <= PIDS_LIMIT
    assert max(samples) >= PIDS_LIMIT // 2  # the bomb did fill the container's quota
    assert refused > 0  # and the kernel refused forks beyond it
    assert host_checked
    await assert_removed(hardened.docker, bomb, recorder.container_id)


async def test_no_network_not_even_the_hosts_loopback(hardened: Harness) -> None:
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nhost secret\n")
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # 192.0.2.1 is TEST-NET-1: with no route it cannot leave the container anyway.
    # (This busybox's wget crashes on any URL, network or not, so nc speaks HTTP.)
    script = (
        f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 127.0.0.1 {port}; echo http=$?; "
        f"nc -w 3 127.0.0.1 {port} </dev/null; echo nc_local=$?; "
        "nc -w 3 192.0.2.1 80 </dev/null; echo nc_remote=$?; "
        "grep -c : /proc/net/dev; wc -l < /proc/net/route"
    )
    spec = hardened.spec(script)
    try:
        result, created = await run(hardened, spec)
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 0
    assert "host secret" not in result.stdout
    out = result.stdout.split()
    assert out[:3] == ["http=1", "nc_local=1", "nc_remote=1"], result
    assert out[3] == "1"  # one interface: lo
    assert out[4] == "1"  # the route table is its header alone
    assert "Network is unreachable" in result.stderr
    await assert_removed(hardened.docker, spec, created.container_id)


async def test_symlinks_to_host_files_never_leak_them(hardened: Harness, tmp_path: Path) -> None:
    """The service reads only a job's log streams, never a file from its container."""
    secret = f"host-secret-{uuid.uuid4().hex}"
    host_file = tmp_path / "secret.txt"
    host_file.write_text(secret)
    targets = [str(host_file), "/etc/shadow", "/proc/1/root/etc/shadow", "/var/run/docker.sock"]
    links = "; ".join(f"ln -s {target} /tmp/link{n}" for n, target in enumerate(targets))
    script = f"{links}; ls /tmp | wc -l; cat /tmp/link* 2>/dev/null; echo done"
    spec = hardened.spec(script, working_dir="/tmp")
    result, created = await run(hardened, spec)
    assert result.stdout == f"{len(targets)}\ndone\n"
    assert secret not in result.stdout + result.stderr
    await assert_removed(hardened.docker, spec, created.container_id)


def test_the_service_never_copies_files_out_of_a_container() -> None:
    """No engine call that reads a container's filesystem appears in the service's code."""
    calls = re.compile(r"get_archive|put_archive|\.archive\(|/archive|\.export\(")
    offenders = [
        f"{path.relative_to(APP)}:{number}"
        for path in APP.rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if calls.search(line)
    ]
    assert offenders == []
