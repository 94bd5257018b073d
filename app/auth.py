"""API keys: how they look, how they are stored, and who presented one.

A key is `jdk_` + 32 random bytes (URL-safe base64). Only its SHA-256 (hex) is stored;
a presented key is hashed, looked up by that hash, and compared with
`hmac.compare_digest`. With no key configured (no key that is not revoked), the service
is open: every caller is treated like an admin, as before keys existed.
"""

import hashlib
import hmac
import ipaddress
import logging
import secrets
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Reader
from app.store import keys as key_store

logger = logging.getLogger(__name__)

KEY_PREFIX = "jdk_"
KEY_BYTES = 32


@dataclass(frozen=True)
class Principal:
    """Who made a request: the key that authenticated it."""

    key_id: uuid.UUID
    name: str
    admin: bool
    max_queued: int | None = None
    max_running: int | None = None

    @classmethod
    def of(cls, key: Mapping[str, Any]) -> "Principal":
        """From a key's columns by name (app.store.keys.find_active_key)."""
        return cls(
            key_id=key["id"],
            name=key["name"],
            admin=key["admin"],
            max_queued=key["max_queued"],
            max_running=key["max_running"],
        )


class NotAuthenticated(Exception):
    """Keys are configured and the request carries none that is valid."""


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_filter(principal: Principal | None) -> uuid.UUID | None:
    """The owner whose jobs a caller may see: None (all jobs) for an admin or the open mode."""
    return None if principal is None or principal.admin else principal.key_id


def owner_of_new_jobs(principal: Principal | None) -> uuid.UUID | None:
    return None if principal is None else principal.key_id


async def authenticate(session: Reader, presented: str | None) -> Principal | None:
    """The principal of a presented key; None when no key is configured (open mode).

    Raises NotAuthenticated when keys exist and `presented` is missing, unknown or revoked.
    One indexed query for a valid key; a second only to tell the open mode from a bad key.
    """
    if presented:
        digest = hash_key(presented)
        key = await key_store.find_active_key(session=session, key_hash=digest)
        # The lookup is by hash; the comparison of what was found is constant-time.
        if key is not None and hmac.compare_digest(key["key_hash"], digest):
            return Principal.of(key)
    if not await key_store.any_active_key(session=session):
        return None
    raise NotAuthenticated(
        "a valid API key is required: send it as `Authorization: Bearer <key>`"
        if presented is None
        else "the API key is not valid (unknown or revoked)"
    )


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, keys_configured: bool) -> str | None:
    """The warning to give when the service listens beyond loopback without keys."""
    if keys_configured or is_loopback(host):
        return None
    return (
        f"SECURITY WARNING: jobdock listens on {host} and no API key is configured: "
        "anyone who can reach this port can run containers on this host. "
        "Create a key with `jobdock keys create NAME --admin`, or listen on 127.0.0.1."
    )


async def warn_if_exposed(session: AsyncSession, host: str) -> str | None:
    """Log (and print to stderr) the exposure warning if it applies; returns it."""
    warning = exposure_warning(host, await key_store.any_active_key(session=session))
    if warning is not None:
        logger.warning(warning)
        print(warning, file=sys.stderr, flush=True)
    return warning
