"""Hotspots from py-spy's raw (folded) stacks: `frame;frame;... count` per line."""

import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})"


def hotspots(
    path: Path, top: int = 15
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Samples, the top functions by own time (leaf), and app/ functions by inclusive time."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if total == 0:
        return 0, [], []
    global _last_inclusive
    _last_inclusive = [
        (name, 100 * n / total)
        for name, n in inclusive.most_common()
        if _package(name) in INTERESTING
    ][:top]
    own_top = [(name, 100 * n / total) for name, n in own.most_common(top)]
    app_top = [(name, 100 * n / total) for name, n in inclusive.most_common() if "(app/" in name][
        :top
    ]
    return total, own_top, app_top


# Libraries whose inclusive time says where the work goes (wrappers such as uvicorn,
# starlette middleware, typer and asyncio are left out: they contain everything).
INTERESTING = {
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "pydantic",
    "sqlmodel",
    "aiohttp",
    "aiodocker",
    "stdlib:logging",
    "logging",
    "json",
    "stdlib:json",
}
# The heaviest library functions by inclusive time, from the last call of hotspots().
_last_inclusive: list[tuple[str, float]] = []


def _package(name: str) -> str:
    """The top-level package of a frame name such as `f (sqlalchemy/orm/session.py)`."""
    inside = name.rsplit("(", 1)[-1].rstrip(")")
    head = inside.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in inside else f"stdlib:{head.removesuffix('.py')}"


def packages(path: Path, top: int = 10) -> list[tuple[str, float]]:
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        leaf = _name(stack.split(";")[-1])
        own[_package(leaf)] += int(count_text)
        total += int(count_text)
    return [(name, 100 * n / total) for name, n in own.most_common(top)] if total else []


def report(path: Path, top: int = 15, rate: int = 200) -> str:
    total, own_top, app_top = hotspots(path, top)
    seconds_file = Path(f"{path}.seconds")
    busy = ""
    if seconds_file.exists():
        seconds = float(seconds_file.read_text())
        busy = f", GIL held {100 * total / (seconds * rate):.0f}% of {seconds:.0f} s"
    lines = [
        f"### {path.name}: {total} samples of threads holding the GIL ({rate} Hz{busy})",
        "",
        "Own time by package: "
        + ", ".join(f"{name} {share:.0f}%" for name, share in packages(path)),
        "",
        "Own time (leaf function):",
        "",
    ]
    lines += [f"- {share:5.1f}%  {name}" for name, share in own_top]
    lines += ["", "Inclusive, app/ functions:", ""]
    lines += [f"- {share:5.1f}%  {name}" for name, share in app_top]
    lines += [
        "",
        "Inclusive, library functions (sqlalchemy, aiosqlite, pydantic, aiohttp, ...):",
        "",
    ]
    lines += [f"- {share:5.1f}%  {name}" for name, share in _last_inclusive]
    return "\n".join(lines)
