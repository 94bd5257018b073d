"""`jobdock keys create | list | revoke`: API keys, managed directly in the database of
JOBDOCK_DATABASE_URL (like `jobdock migrate`), never over HTTP."""

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import ApiKeyNameTaken, ApiKeyNotFound
from app.settings import Settings

keys_cli = typer.Typer(
    help="Manage API keys (in the database of JOBDOCK_DATABASE_URL).", no_args_is_help=True
)

T = TypeVar("T")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


def _with_session(work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in a session on the migrated database."""
    from app.db import create_engine, create_session_factory, upgrade_to_head

    async def run() -> T:
        engine = create_engine(Settings().database_url)
        try:
            await upgrade_to_head(engine)
            async with create_session_factory(engine)() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _fail(message: str) -> None:
    typer.echo(f"jobdock: {message}", err=True)
    raise typer.Exit(1)


@keys_cli.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A unique name: 1-64 letters, digits, . _ @ -")],
    admin: Annotated[bool, typer.Option("--admin", help="Sees and manages every job.")] = False,
    max_queued: Annotated[
        int | None, typer.Option(min=0, help="At most this many of its jobs queued at once.")
    ] = None,
    max_running: Annotated[
        int | None, typer.Option(min=0, help="At most this many of its jobs running at once.")
    ] = None,
) -> None:
    """Create an API key and print it once: only its hash is stored."""
    import re

    from app.auth import generate_key, hash_key
    from app.store import keys as key_store

    if not re.match(NAME_PATTERN, name):
        raise typer.BadParameter("1-64 letters, digits, '.', '_', '@' or '-'", param_hint="NAME")
    key = generate_key()
    try:
        _with_session(
            lambda session: key_store.create_key(
                session=session,
                name=name,
                key_hash=hash_key(key),
                admin=admin,
                max_queued=max_queued,
                max_running=max_running,
            )
        )
    except ApiKeyNameTaken as exc:
        _fail(exc.message)
    typer.echo(key)
    typer.echo(
        f"jobdock: created {'admin ' if admin else ''}key {name!r}; it is shown only now, "
        "store it safely (send it as `Authorization: Bearer <key>` or JOBDOCK_API_KEY)",
        err=True,
    )


@keys_cli.command("list")
def list_keys() -> None:
    """List the keys: name, role, quotas, created and revoked (never the key itself)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from app.store import keys as key_store

    keys = _with_session(lambda session: key_store.list_keys(session=session))
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in ("NAME", "ROLE", "MAX QUEUED", "MAX RUNNING", "CREATED (UTC)", "REVOKED (UTC)"):
        table.add_column(column, no_wrap=True)
    for key in keys:
        table.add_row(
            key.name,
            "admin" if key.admin else "tenant",
            "-" if key.max_queued is None else str(key.max_queued),
            "-" if key.max_running is None else str(key.max_running),
            key.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            "" if key.revoked_at is None else key.revoked_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


@keys_cli.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: requests with it are refused (401) from now on."""
    from app.store import keys as key_store

    try:
        _with_session(lambda session: key_store.revoke_key(session=session, name=name))
    except ApiKeyNotFound as exc:
        _fail(exc.message)
    typer.echo(f"revoked {name}")
