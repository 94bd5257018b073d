"""Small asyncio helpers shared by the worker and the webhook deliverer."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def finish_despite_cancel(coro: Coroutine[Any, Any, T]) -> T:
    """Run a write or a cleanup to the end even if the caller is being cancelled, then
    re-raise the cancellation."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
