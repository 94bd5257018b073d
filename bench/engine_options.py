"""Engine options (issue 6): which HostConfig or lifecycle choice makes a job cheaper.

The same trivial job as part 1 (`echo hi` in `jobdock-test-busybox`; exit code 0 and
output "hi\\n" checked every time) is run N times by the bare aiodocker loop of part 1 at
concurrency C, once per variant per round. Each variant makes one change to the baseline,
which is Jobdock's own config (`ContainerRunner._container_config`, read afresh at the
start of the run) and part 1's lifecycle: create, start, wait, logs, `DELETE ?force=1`.
Variants run interleaved, in an order rotated every round, and each round's jobs/s is
divided by the baseline's of the same round; the table shows the median of those ratios.

    .venv/bin/python -m bench.engine_options [--jobs 100] [--concurrency 4] [--rounds 3]
                                             [--variants baseline,attach,...]
    .venv/bin/python -m bench --parts options ...     # the same, as a part of the suite

Before anything is timed, every variant runs `cat /proc/net/dev` once by its own lifecycle
and must show the loopback interface only: no variant may give a job a network.
"""

import argparse
import asyncio
import copy
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.stream import Stream
from yarl import URL

from bench.common import (
    BenchError,
    Results,
    check,
    machine_description,
    median,
    ms,
    percentile,
)
from bench.engine import EXPECTED, CpuMeter, Run, container_config, metered
from tests.support.images import ensure_test_image

Output = Literal["logs", "attach"]
Remove = Literal["force", "plain", "auto-removed", "auto-next-exit"]
Edit = Callable[[dict[str, Any]], None]
# Every container of a batch carries this label with the batch's id: the batch is over
# only when none is left (auto-removal may still be running when the job's wait returns).
BATCH_LABEL = "jobdock.bench-batch"


@dataclass(frozen=True)
class Variant:
    name: str
    change: str
    edits: tuple[Edit, ...] = ()
    output: Output = "logs"
    remove: Remove = "force"

    def config(self, base: dict[str, Any], batch: str) -> dict[str, Any]:
        config = copy.deepcopy(base)
        config["Labels"] = {**config.get("Labels", {}), BATCH_LABEL: batch}
        for edit in self.edits:
            edit(config)
        return config


def host(**changes: Any) -> Edit:
    """Set (or, with None, drop) HostConfig keys."""

    def edit(config: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is None:
                config["HostConfig"].pop(key, None)
            else:
                config["HostConfig"][key] = value

    return edit


def log_driver(kind: str) -> Edit:
    def edit(config: dict[str, Any]) -> None:
        log_config = config["HostConfig"]["LogConfig"]
        # `local` takes json-file's max-size/max-file, but compresses rotated files by
        # default, which the engine refuses with max-file 1; `none` takes no options.
        options = {} if kind == "none" else dict(log_config.get("Config", {}))
        if kind == "local":
            options["compress"] = "false"
        config["HostConfig"]["LogConfig"] = {"Type": kind, "Config": options}

    return edit


def drop_network_disabled(config: dict[str, Any]) -> None:
    config.pop("NetworkDisabled", None)


AUTO_REMOVE = host(AutoRemove=True)

VARIANTS = (
    Variant("baseline", "Jobdock's config; create, start, wait, logs, DELETE ?force=1"),
    Variant(
        "log-local",
        "LogConfig `local` (same max-size/max-file, compress false)",
        (log_driver("local"),),
    ),
    Variant(
        "attach",
        "output from one attach (stream, stdout, stderr) made before start, not logs",
        output="attach",
    ),
    Variant(
        "log-none+attach",
        "LogConfig `none`; output from attach (logs cannot be read with `none`)",
        (log_driver("none"),),
        output="attach",
    ),
    Variant("no-init", "Init false", (host(Init=False),)),
    Variant(
        "net-disabled-only",
        "NetworkDisabled only: HostConfig.NetworkMode dropped",
        (host(NetworkMode=None),),
    ),
    Variant(
        "net-mode-only",
        "NetworkMode none only: NetworkDisabled dropped",
        (drop_network_disabled,),
    ),
    Variant("delete-plain", "DELETE without force (v=0)", remove="plain"),
    Variant(
        "autoremove",
        "AutoRemove; output from attach; wait condition=removed sent before start",
        (AUTO_REMOVE,),
        output="attach",
        remove="auto-removed",
    ),
    Variant(
        "autoremove-next-exit",
        "as autoremove, but wait condition=next-exit (the batch still waits for removal)",
        (AUTO_REMOVE,),
        output="attach",
        remove="auto-next-exit",
    ),
    Variant("no-tmpfs", "no Tmpfs /tmp (cost only: kept)", (host(Tmpfs=None),)),
    Variant(
        "ns-unset",
        "IpcMode/CgroupnsMode unset (cost only: kept private)",
        (host(IpcMode=None, CgroupnsMode=None),),
    ),
    Variant(
        "combined",
        "attach before start + LogConfig `local` + DELETE without force",
        (log_driver("local"),),
        output="attach",
        remove="plain",
    ),
    Variant(
        "combined-none-auto",
        "attach before start + LogConfig `none` + AutoRemove (wait removed)",
        (log_driver("none"), AUTO_REMOVE),
        output="attach",
        remove="auto-removed",
    ),
)
BY_NAME = {variant.name: variant for variant in VARIANTS}


# ------------------------------------------------------------------------------------
# One job by a variant's lifecycle


def attach_stream(docker: aiodocker.Docker, container_id: str) -> Stream:
    """`POST /containers/{id}/attach?stream=1&stdout=1&stderr=1`, without the inspect
    aiodocker's `container.attach()` makes to learn the Tty flag (always false here)."""

    async def setup() -> tuple[URL, bytes | None, bool]:
        query = {"stream": 1, "stdout": 1, "stderr": 1}
        return URL(f"containers/{container_id}/attach").with_query(query), None, False

    return Stream(docker, setup)


async def read_all(stream: Stream) -> str:
    chunks = []
    while (message := await stream.read_out()) is not None:
        chunks.append(message.data)
    return b"".join(chunks).decode()


async def wait_registered(
    docker: aiodocker.Docker, container_id: str, condition: str
) -> aiohttp.ClientResponse:
    """A wait the engine has registered: since API 1.30 it sends the headers first, so
    once they are here the exit (or removal) cannot be missed."""
    return await docker._do_query(
        f"containers/{container_id}/wait",
        method="POST",
        params={"condition": condition},
        timeout=None,
    )


async def exit_status(response: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        status: dict[str, Any] = await response.json()
        return status
    finally:
        response.release()


async def run_job(
    docker: aiodocker.Docker, variant: Variant, config: dict[str, Any]
) -> tuple[int, str]:
    """Create, run and remove one container; its exit code and output (stdout+stderr)."""
    container = await docker.containers.create(config)
    removed = False
    stream: Stream | None = None
    waiting: aiohttp.ClientResponse | None = None
    try:
        if variant.output == "attach":
            stream = attach_stream(docker, container.id)
            await stream.__aenter__()
        if variant.remove.startswith("auto"):
            condition = "removed" if variant.remove == "auto-removed" else "next-exit"
            waiting = await wait_registered(docker, container.id, condition)
        await container.start()
        if stream is not None:
            output = await read_all(stream)
        if waiting is not None:
            status = await exit_status(waiting)
            waiting = None
            removed = variant.remove == "auto-removed"
        else:
            status = await container.wait()
        if stream is None:
            output = "".join(await container.log(stdout=True, stderr=True))
        check(not status.get("Error"), f"{variant.name}: wait said {status}")
        if variant.remove == "force":
            await container.delete(force=True)
            removed = True
        elif variant.remove == "plain":
            await container.delete()
            removed = True
        elif variant.remove == "auto-next-exit":
            removed = True  # by the engine, checked at the batch's end
        return int(status["StatusCode"]), output
    finally:
        if stream is not None:
            await stream.close()
        if waiting is not None:
            waiting.close()
        if not removed:
            await remove_quietly(container)


async def remove_quietly(container: DockerContainer) -> None:
    try:
        await container.delete(force=True)
    except aiodocker.DockerError as exc:
        if exc.status != 404:
            raise


async def leftovers(docker: aiodocker.Docker, batch: str) -> list[str]:
    found = await docker.containers.list(all=True, filters={"label": [f"{BATCH_LABEL}={batch}"]})
    return [container.id for container in found]


async def settle(docker: aiodocker.Docker, batch: str, variant: Variant) -> None:
    """Wait (for auto-removal) until no container of the batch is left; fail after 60 s."""
    deadline = time.monotonic() + 60
    while remaining := await leftovers(docker, batch):
        if variant.remove != "auto-next-exit" or time.monotonic() > deadline:
            for container_id in remaining:
                await remove_quietly(docker.containers.container(container_id))
            raise BenchError(f"{variant.name}: {len(remaining)} containers left behind")
        await asyncio.sleep(0.05)


async def batch(
    docker: aiodocker.Docker,
    variant: Variant,
    base: dict[str, Any],
    jobs: int,
    concurrency: int,
) -> Run:
    """N jobs at concurrency C; latencies are per job (create to removed), not queueing."""
    batch_id = uuid.uuid4().hex[:12]
    config = variant.config(base, batch_id)
    slots = asyncio.Semaphore(concurrency)
    start = time.perf_counter()

    async def one() -> float:
        async with slots:
            began = time.perf_counter()
            code, output = await run_job(docker, variant, config)
            check(code == 0, f"{variant.name}: exit code {code}")
            check(output == EXPECTED, f"{variant.name}: printed {output!r}")
            return time.perf_counter() - began

    latencies = await asyncio.gather(*(one() for _ in range(jobs)))
    await settle(docker, batch_id, variant)
    return Run(jobs / (time.perf_counter() - start), list(latencies))


async def check_isolated(docker: aiodocker.Docker, variant: Variant, base: dict[str, Any]) -> None:
    """The variant's job sees the loopback interface only (and its lifecycle works)."""
    batch_id = uuid.uuid4().hex[:12]
    config = variant.config(base, batch_id)
    config["Cmd"] = ["cat", "/proc/net/dev"]
    code, output = await run_job(docker, variant, config)
    await settle(docker, batch_id, variant)
    check(code == 0, f"{variant.name}: cat /proc/net/dev exited {code}")
    interfaces = sorted(line.split(":")[0].strip() for line in output.splitlines() if ":" in line)
    check(interfaces == ["lo"], f"{variant.name}: the job sees interfaces {interfaces}")


# ------------------------------------------------------------------------------------
# Rounds and the table


@dataclass
class Measured:
    variant: Variant
    runs: list[Run] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def cpu(self, name: str) -> float:
        return median([run.cpu_per_job.get(name, float("nan")) * 1000 for run in self.runs])


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f"{min(values):.2f}-{max(values):.2f}"


async def measure(
    docker: aiodocker.Docker,
    image: str,
    *,
    jobs: int,
    concurrency: int,
    rounds: int,
    variants: list[Variant],
) -> list[Measured]:
    base = container_config(docker, image)
    print(f"baseline HostConfig: {base['HostConfig']}", flush=True)
    print(f"baseline NetworkDisabled: {base.get('NetworkDisabled')}", flush=True)
    for variant in variants:
        await check_isolated(docker, variant, base)
    print(f"isolation checked: {len(variants)} variants see `lo` only", flush=True)
    meter = CpuMeter(None)
    measured = [Measured(variant) for variant in variants]
    # Warm up: images, connections, the engine's caches.
    for entry in measured:
        await batch(docker, entry.variant, base, concurrency, concurrency)
    baseline, others = measured[0], measured[1:]
    for index in range(rounds):
        # The others in an order rotated every round; the baseline twice, first and
        # halfway, and each ratio is against the mean of the round's two baseline rates.
        shift = index % max(1, len(others))
        order = others[shift:] + others[:shift]
        order = [baseline, *order[: len(order) // 2], baseline, *order[len(order) // 2 :]]
        rates = []
        for entry in order:
            run = batch(docker, entry.variant, base, jobs, concurrency)
            entry.runs.append(await metered(meter, jobs, run))
            rates.append(f"{entry.variant.name} {entry.runs[-1].jobs_per_second:.2f}/s")
        pair = [run.jobs_per_second for run in baseline.runs[-2:]]
        reference = statistics.mean(pair)
        # For the baseline itself: each of its two runs against their mean (the noise).
        baseline.ratios += [rate / reference for rate in pair]
        for entry in others:
            entry.ratios.append(entry.runs[-1].jobs_per_second / reference)
        print(f"  C={concurrency} round {index + 1}: " + ", ".join(rates), flush=True)
    return measured


def table(measured: list[Measured], concurrency: int, jobs: int) -> str:
    lines = [
        f"| variant (C={concurrency}, N={jobs}) | change from baseline | jobs/s | ratio to "
        "baseline (min-max of rounds) | p50 / p90 per job | "
        "CPU ms/job dockerd / containerd / client |",
        "|---|---|---|---|---|---|",
    ]
    for entry in measured:
        rates = [run.jobs_per_second for run in entry.runs]
        p50 = median([percentile(run.latencies, 0.5) for run in entry.runs])
        p90 = median([percentile(run.latencies, 0.9) for run in entry.runs])
        lines.append(
            f"| {entry.variant.name} | {entry.variant.change} | {statistics.median(rates):.2f} | "
            f"**{median(entry.ratios):.2f}** ({spread(entry.ratios)}) | {ms(p50)} / {ms(p90)} | "
            f"{entry.cpu('dockerd'):.0f} / {entry.cpu('containerd'):.0f} / "
            f"{entry.cpu('client'):.0f} |"
        )
    return "\n".join(lines)


async def run(
    results: Results,
    *,
    docker: aiodocker.Docker,
    image: str,
    jobs: int,
    concurrencies: list[int],
    rounds: int,
    variants: list[Variant] | None = None,
) -> list[str]:
    """Add one row per variant and C to `results`; return the markdown tables."""
    chosen = variants or list(VARIANTS)
    if chosen[0].name != "baseline":
        chosen = [BY_NAME["baseline"], *[v for v in chosen if v.name != "baseline"]]
    tables = []
    for concurrency in concurrencies:
        measured = await measure(
            docker, image, jobs=jobs, concurrency=concurrency, rounds=rounds, variants=chosen
        )
        for entry in measured:
            p50 = median([percentile(run.latencies, 0.5) for run in entry.runs])
            results.add(
                "options",
                f"C={concurrency} {entry.variant.name}: jobs/s; ratio; p50; CPU ms/job "
                "dockerd/containerd",
                f"{median([r.jobs_per_second for r in entry.runs]):.2f}; "
                f"{median(entry.ratios):.2f}; {ms(p50)}; "
                f"{entry.cpu('dockerd'):.0f}/{entry.cpu('containerd'):.0f}",
            )
        tables.append(table(measured, concurrency, jobs))
    return tables


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine_options", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--jobs", type=int, default=100, help="jobs per batch (100)")
    parser.add_argument("--concurrency", type=int, default=4, help="C (4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all variants (3)")
    parser.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS),
        help="comma-separated subset (baseline is always run)",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = set(names) - set(BY_NAME)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    args.variants = [BY_NAME[name] for name in names]
    return args


async def main(args: argparse.Namespace) -> list[str]:
    async with aiodocker.Docker() as docker:
        image = await ensure_test_image(docker)
        return await run(
            Results(),
            docker=docker,
            image=image,
            jobs=args.jobs,
            concurrencies=[args.concurrency],
            rounds=args.rounds,
            variants=args.variants,
        )


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for line in machine_description():
        print(line, flush=True)
    began = time.monotonic()
    try:
        tables = asyncio.run(main(args))
    except BenchError as exc:
        print(f"bench aborted: {exc}", file=sys.stderr)
        return 1
    print("\n" + "\n\n".join(tables))
    print(f"\nrun took {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
