"""Builds the test image FROM scratch with Debian's static busybox: no registry needed.

Run `python -m tests.support.images` to build it by hand (`make test-image`).
"""

import asyncio
import io
import tarfile
from pathlib import Path

import aiodocker
from aiodocker.exceptions import DockerError

TEST_IMAGE = "jobdock-test-busybox:latest"
BUSYBOX = Path("/bin/busybox")

DOCKERFILE = b"""\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
WORKDIR /
CMD ["sh", "-c", "echo hello from the default command"]
"""


def _is_static(binary: bytes) -> bool:
    # A dynamic ELF names its loader in a PT_INTERP segment near the start.
    return binary[:4] == b"\x7fELF" and b"ld-linux" not in binary[:4096]


def build_context() -> io.BytesIO:
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} is missing: install Debian's busybox-static")
    binary = BUSYBOX.read_bytes()
    if not _is_static(binary):
        raise RuntimeError(f"{BUSYBOX} is not static: install Debian's busybox-static")
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data, mode in (("Dockerfile", DOCKERFILE, 0o644), ("busybox", binary, 0o755)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    return context


async def ensure_test_image(docker: aiodocker.Docker, *, rebuild: bool = False) -> str:
    if not rebuild:
        try:
            await docker.images.inspect(TEST_IMAGE)
            return TEST_IMAGE
        except DockerError as exc:
            if exc.status != 404:
                raise
    await docker.images.build(
        fileobj=build_context(), encoding="application/x-tar", tag=TEST_IMAGE, rm=True
    )
    await docker.images.inspect(TEST_IMAGE)
    return TEST_IMAGE


async def _main() -> None:
    async with aiodocker.Docker() as docker:
        print(await ensure_test_image(docker, rebuild=True))


if __name__ == "__main__":
    asyncio.run(_main())
