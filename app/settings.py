"""Every setting of Jobdock, read once from `JOBDOCK_*` environment variables."""

import json
import os
import re
import socket
from datetime import timedelta
from functools import lru_cache
from typing import Annotated, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MIB = 1024 * 1024
DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\Z")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Operator settings. Job submitters can only ask for less than these caps."""

    model_config = SettingsConfigDict(env_prefix="JOBDOCK_", extra="ignore")

    # Where jobs are stored: SQLite file by default, or postgresql+asyncpg://...
    database_url: str = "sqlite+aiosqlite:///./jobdock.db"
    # Docker engine address; empty means DOCKER_HOST, then the local socket.
    docker_host: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # `jobdock worker` serves its Prometheus metrics on this port of `host` (None: not at
    # all); `serve` has them at /metrics on its own port.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Logs on stderr: one JSON object per line ("json"), or plain lines for humans ("text").
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    workers: int = Field(default=4, ge=0, le=256)
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1, max_length=255)
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_interval_seconds: float = Field(default=5.0, gt=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # A labelled container of a job this database does not know is removed only this old,
    # so a container being created right now is never reaped.
    leftover_grace_seconds: float = Field(default=60.0, ge=0)

    # A failed attempt is retried after base * 2**(attempt-1) seconds, capped, with jitter.
    retry_backoff_seconds: float = Field(default=2.0, ge=0)
    retry_backoff_max_seconds: float = Field(default=300.0, ge=0)

    default_cpu_shares: int = Field(default=1024, ge=2, le=262144)
    default_memory_mb: int = Field(default=256, ge=6)
    max_memory_mb: int = Field(default=4096, ge=6)
    default_timeout_seconds: int = Field(default=300, ge=1)
    max_timeout_seconds: int = Field(default=3600, ge=1)
    pids_limit: int = Field(default=256, ge=8)
    output_limit_bytes: int = Field(default=MIB, ge=1024)

    # Container hardening (see README "Security"). Only the operator can widen these.
    # Images a job may name: fnmatch patterns on the reference as submitted, matched
    # case-sensitively; env as a JSON list or comma-separated ("registry.local/*,busybox:*").
    allowed_images: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    # A hard CPU cap per job (NanoCpus = cpus * 1e9), beside the relative cpu_shares.
    # The engine refuses more than the CPUs of its host.
    default_cpus: float = Field(default=1.0, ge=0.01)
    max_cpus: float = Field(default_factory=lambda: float(os.cpu_count() or 1), ge=0.01)
    # The root filesystem is read-only; /tmp is a tmpfs of this size (counted in the
    # job's memory), mounted nosuid,nodev but exec, so a job may run scripts it writes.
    read_only_rootfs: bool = True
    tmp_size_mb: int = Field(default=64, ge=1)
    # The user (uid:gid, or a name the image knows) every job runs as. With
    # allow_image_user the container gets no User and runs as the image's own USER,
    # which is root for an image that declares none.
    job_user: str = Field(default="65534:65534", min_length=1, max_length=255)
    allow_image_user: bool = False
    # Per-process ulimits (soft = hard, so a job cannot raise them).
    ulimit_nofile: int = Field(default=1024, ge=16)
    ulimit_fsize_mb: int = Field(default=64, ge=1)
    # Docker networks a job may be attached to; jobs get "none" (loopback only).
    # "host" and "container:<id>" are refused: they share a namespace of the host.
    allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["none"])
    # Size of the engine's own json-file log per container (disk, not service memory).
    engine_log_max_bytes: int = Field(default=64 * MIB, ge=MIB)
    pull_timeout_seconds: float = Field(default=300.0, gt=0)
    # Deadline for a single short engine call (create, start, inspect, kill, remove).
    engine_call_timeout_seconds: float = Field(default=60.0, gt=0)
    # Largest `stdin` a job may carry, in bytes of UTF-8.
    stdin_max_bytes: int = Field(default=MIB, ge=0)
    # Largest request body, in bytes (413 above it). It bounds a batch too: the default
    # admits one job with the largest stdin even if its JSON escapes every character 3x.
    max_request_bytes: int = Field(default=4 * MIB, ge=1024)

    # GET /jobs/{id}?wait= waits at most this long; longer asks are shortened to it.
    wait_max_seconds: float = Field(default=60.0, ge=0)
    # Above this many queued jobs POST /jobs answers 503 (0: no limit).
    max_queued: int = Field(default=10_000, ge=0)
    # The Retry-After a 503 for a full queue carries.
    queue_full_retry_after_seconds: int = Field(default=5, ge=1)
    # An Idempotency-Key is remembered this long (seconds, or ISO 8601 such as P1D).
    idempotency_ttl: timedelta = Field(default=timedelta(hours=24))
    # Finished jobs and their logs are purged this long after they finish (0: kept forever).
    retention: timedelta = Field(default=timedelta(days=7))
    # How often a running job's new output is written to the database as a log chunk.
    log_flush_interval_seconds: float = Field(default=0.25, gt=0)

    # Webhooks: each delivery is signed with HMAC-SHA256 under this secret.
    webhook_secret: SecretStr | None = None
    webhook_max_attempts: int = Field(default=5, ge=1, le=50)
    webhook_backoff_seconds: float = Field(default=1.0, ge=0)
    webhook_backoff_max_seconds: float = Field(default=300.0, ge=0)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("idempotency_ttl", "retention", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        """Seconds ("3600"), a number with a unit ("90s", "30m", "24h", "7d"), or ISO 8601."""
        if isinstance(value, str):
            match = DURATION.match(value.strip())
            if match:
                number, unit = float(match.group(1)), match.group(2) or "s"
                return timedelta(seconds=number * DURATION_UNITS[unit])
        return value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("allowed_images", "allowed_networks", mode="before")
    @classmethod
    def _name_list(cls, value: object) -> object:
        """A JSON list, or names separated by commas (blanks around them ignored)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("allowed_images", "allowed_networks")
    @classmethod
    def _not_empty(cls, names: list[str]) -> list[str]:
        if not names or not all(names):
            raise ValueError("must name at least one, and no empty names")
        return names

    @field_validator("allowed_networks")
    @classmethod
    def _no_host_namespaces(cls, networks: list[str]) -> list[str]:
        for network in networks:
            if network == "host" or network.startswith("container:"):
                raise ValueError(f"network {network!r} shares a host namespace; never allowed")
        return networks

    @model_validator(mode="after")
    def _defaults_within_caps(self) -> Self:
        if self.default_cpus > self.max_cpus:
            raise ValueError("default_cpus must not exceed max_cpus")
        if self.default_memory_mb > self.max_memory_mb:
            raise ValueError("default_memory_mb must not exceed max_memory_mb")
        if self.default_timeout_seconds > self.max_timeout_seconds:
            raise ValueError("default_timeout_seconds must not exceed max_timeout_seconds")
        if self.heartbeat_interval_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_interval_seconds must be shorter than lease_seconds")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
