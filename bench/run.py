"""Jobdock's benchmarks (issue 6): one run, one machine, side by side.

    .venv/bin/python -m bench [--quick] [--parts engine,api,memory,database]
                              [--database sqlite|postgres] [--profile DIR] [--markdown FILE]

`make bench BENCH_ARGS="--quick"` runs the same. Parts:
  engine    the bare aiodocker loop (a) against Jobdock end to end (b), C in 1 2 4 8
  api       POST /jobs and GET /jobs/{id} at 32 clients beside a bare FastAPI endpoint
  memory    the service's peak RSS while jobs print a lot, and while paging 10,000 jobs
  database  claim+finish cycles/s through the store against the same SQL raw
  options   (only when named) HostConfig/lifecycle variants of the bare loop, C=4 unless
            --concurrency is given (bench/engine_options.py)
Every measured answer is checked; a wrong one aborts the run (exit status 1).
"""

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiodocker

from bench import api, database, engine, engine_options, memory
from bench.common import BenchError, Database, Results, machine_description, postgres_server_url
from bench.profile import report
from tests.support.images import ensure_test_image

DEFAULT_PARTS = ("engine", "api", "memory", "database")
PARTS = (*DEFAULT_PARTS, "options")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small N, one round: a smoke run")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help="comma-separated subset")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--jobs", type=int, help="part 1: jobs per run (default 100)")
    parser.add_argument("--concurrency", help="part 1: comma-separated C (default 1,2,4,8)")
    parser.add_argument("--rounds", type=int, help="a/b rounds per measure (default 2)")
    parser.add_argument("--poll", type=float, default=0.1, help="part 1: plain polling period")
    parser.add_argument("--poll-at", default="1,4", help="part 1: C with a polling run too")
    parser.add_argument("--seconds", type=float, help="part 2: seconds per load (default 10)")
    parser.add_argument(
        "--api-client", choices=("auto", "wrk", "aiohttp", "httpx", "both"), default="both"
    )
    parser.add_argument("--sizes", default="20,200", help="part 3: MB printed per job")
    parser.add_argument("--finished-jobs", type=int, help="part 3: jobs to page (10000)")
    parser.add_argument("--cycles", type=int, help="part 4: jobs claimed per run (2000)")
    parser.add_argument("--profile", type=Path, help="py-spy folded stacks into this directory")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    quick = args.quick
    args.options_concurrency = [4] if args.concurrency is None else None
    args.jobs = args.jobs or (20 if quick else 100)
    args.concurrency = [
        int(c) for c in (args.concurrency or ("1,4" if quick else "1,2,4,8")).split(",")
    ]
    args.options_concurrency = args.options_concurrency or args.concurrency
    args.rounds = args.rounds or (1 if quick else 2)
    args.seconds = args.seconds or (3.0 if quick else 10.0)
    args.finished_jobs = args.finished_jobs or (1000 if quick else 10_000)
    args.cycles = args.cycles or (300 if quick else 2000)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if quick and args.sizes == [20, 200]:
        args.sizes = [5, 50]
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


async def main(args: argparse.Namespace) -> Results:
    results = Results()
    db = Database(args.database)
    if args.database == "postgres":
        db.server_url = postgres_server_url()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="jobdock-bench-") as tmp:
            workdir = Path(tmp)
            async with aiodocker.Docker() as docker:
                image = await ensure_test_image(docker)
                if "engine" in args.parts:
                    print("# part 1: engine limit vs Jobdock", flush=True)
                    await engine.run(
                        results,
                        docker=docker,
                        image=image,
                        workdir=workdir,
                        database=db,
                        jobs=args.jobs,
                        concurrencies=args.concurrency,
                        rounds=args.rounds,
                        poll_seconds=args.poll,
                        poll_at={int(c) for c in args.poll_at.split(",") if c},
                        latency_jobs=max(10, args.jobs // 3),
                        profile_dir=args.profile,
                        profile_at=4,
                    )
                if "options" in args.parts:
                    print("# engine options (bare loop variants)", flush=True)
                    tables = await engine_options.run(
                        results,
                        docker=docker,
                        image=image,
                        jobs=args.jobs,
                        concurrencies=args.options_concurrency,
                        rounds=args.rounds,
                    )
                    print("\n" + "\n\n".join(tables), flush=True)
            if "api" in args.parts:
                print("# part 2: API under load", flush=True)
                await api.run(
                    results,
                    workdir=workdir,
                    database=db,
                    seconds=args.seconds,
                    rounds=args.rounds + (0 if args.quick else 1),
                    clients=api.available_clients(args.api_client),
                    profile_dir=args.profile,
                )
            if "memory" in args.parts:
                print("# part 3: memory", flush=True)
                await memory.run(
                    results,
                    image=image,
                    workdir=workdir,
                    database=db,
                    sizes=args.sizes,
                    finished_jobs=args.finished_jobs,
                )
            if "database" in args.parts:
                print("# part 4: database", flush=True)
                await database.run(
                    results,
                    workdir=workdir,
                    database=db,
                    jobs=args.cycles,
                    rounds=args.rounds + (0 if args.quick else 1),
                    profile_dir=args.profile,
                )
    finally:
        await db.drop_all()
    results.note(f"run took {time.monotonic() - began:.0f} s")
    return results


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = machine_description()
    for line in machine:
        print(line, flush=True)
    try:
        results = asyncio.run(main(args))
    except BenchError as exc:
        print(f"bench aborted: {exc}", file=sys.stderr)
        return 1
    table = results.markdown()
    profiles = sorted(args.profile.glob("*.txt")) if args.profile is not None else []
    hot = "\n\n".join(report(path) for path in profiles if path.stat().st_size)
    print("\n" + table + ("\n\n" + hot if hot else ""))
    if args.markdown is not None:
        args.markdown.write_text(
            f"Command: `{command.strip()}`\n\n"
            + "\n".join(f"- {line}" for line in machine)
            + "\n\n"
            + table
            + ("\n\n" + hot if hot else "")
            + "\n"
        )
    return 0
