"""Job data: the table, what a caller submits, and what a caller reads back."""

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, HttpUrl, field_validator
from pydantic_core import PydanticCustomError
from sqlmodel import Field, SQLModel

IMAGE_MAX_LENGTH = 255
COMMAND_MAX_ARGS = 256
ENV_MAX_VARS = 256
ARG_MAX_BYTES = 128 * 1024

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
# Docker's reference grammar (distribution/reference), without IPv6 registry hosts.
IMAGE_REFERENCE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?\Z",
    # Docker's \w is ASCII only; without the flag Python's also takes "é" in a tag.
    re.ASCII,
)
# \Z, not $: "$" also matches before a trailing newline.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
# Label keys as in Kubernetes: no ":" (GET /jobs?label=key:value splits on the first one).
LABEL_KEY = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?\Z")
LABELS_MAX = 32
LABEL_VALUE_MAX_LENGTH = 255
CALLBACK_URL_MAX_LENGTH = 2048
CALLBACK_URL = re.compile(r"^[hH][tT][tT][pP][sS]?://[^/?#\s]+(?:[/?#][^\s]*)?\Z")
BATCH_MAX_JOBS = 100
# An Idempotency-Key is at most 255 characters; stored scoped by its owner's id (32 hex + ":").
IDEMPOTENCY_COLUMN_LENGTH = 320


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Stores naive UTC on every backend and hands back aware UTC datetimes.

    SQLite has no time zones; storing naive UTC everywhere keeps ordering and
    comparisons identical on SQLite and PostgreSQL.
    """

    impl = sa.DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    timed_out = "timed_out"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self not in (JobState.queued, JobState.running)


TERMINAL_STATES = tuple(s for s in JobState if s.is_terminal)


class CallbackState(StrEnum):
    """Where a job's webhook is: due, delivered, or given up after its attempts."""

    pending = "pending"
    delivered = "delivered"
    failed = "failed"


def _is_unicode(text: str) -> bool:
    """False for text with a lone surrogate ("\\ud800" in JSON): it cannot be stored or sent."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# What a job asks to run; shared by the submission, the table and the response.
class JobBase(SQLModel):
    image: str = Field(max_length=IMAGE_MAX_LENGTH)
    command: list[str] | None = Field(default=None, sa_type=sa.JSON)
    env: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    working_dir: str | None = Field(default=None, max_length=4096)
    cpu_shares: int | None = Field(default=None, ge=2, le=262144)
    # A hard cap in CPUs (Docker's NanoCpus), beside the relative cpu_shares.
    cpus: float | None = Field(default=None, ge=0.01)
    memory_mb: int | None = Field(default=None, ge=6)
    timeout_seconds: int | None = Field(default=None, ge=1)
    priority: int = Field(default=0, ge=-100, le=100)
    max_attempts: int = Field(default=1, ge=1, le=10, sa_column_kwargs={"server_default": "1"})
    retry_on_exit_codes: list[int] | None = Field(default=None, sa_type=sa.JSON)
    labels: dict[str, str] = Field(default_factory=dict, sa_type=sa.JSON)
    callback_url: str | None = Field(default=None, max_length=CALLBACK_URL_MAX_LENGTH)


# The body of POST /jobs. Caps that depend on settings are checked in the API layer.
class JobCreate(JobBase):
    model_config = ConfigDict(  # type: ignore[assignment]
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "image": "busybox:latest",
                    "command": ["sh", "-c", "echo hi"],
                    "env": {"GREETING": "hello"},
                    "working_dir": "/tmp",
                    "cpu_shares": 512,
                    "cpus": 0.5,
                    "memory_mb": 256,
                    "timeout_seconds": 30,
                    "priority": 0,
                    "max_attempts": 3,
                    "retry_on_exit_codes": [75],
                    "labels": {"team": "ml", "kind": "nightly"},
                    "callback_url": "https://example.com/hooks/jobdock",
                    "stdin": "input for the job\n",
                }
            ]
        },
    )

    # Written to the container's standard input, then closed. Never returned.
    stdin: str | None = Field(default=None)

    @field_validator("labels")
    @classmethod
    def _labels_are_valid(cls, labels: dict[str, str]) -> dict[str, str]:
        if len(labels) > LABELS_MAX:
            raise ValueError(f"labels has {len(labels)} entries; at most {LABELS_MAX}")
        for key, value in labels.items():
            if not LABEL_KEY.match(key):
                raise ValueError(
                    f"label key {key!r} is not valid (1-63 letters, digits, '.', '_', '/', '-', "
                    "starting and ending with a letter or digit; no ':')"
                )
            if len(value) > LABEL_VALUE_MAX_LENGTH or "\x00" in value or not _is_unicode(value):
                raise ValueError(
                    f"label {key}: the value must be at most {LABEL_VALUE_MAX_LENGTH} "
                    "characters of valid Unicode without NUL bytes"
                )
        return labels

    @field_validator("callback_url")
    @classmethod
    def _callback_is_http(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            # The raw text too: pydantic repairs "http:///x" or a trailing newline, an HTTP
            # client does not, and the URL is stored as given.
            if not CALLBACK_URL.match(url) or not url.isprintable() or not _is_unicode(url):
                raise ValueError
            parsed = HttpUrl(url)
        except ValueError:
            raise ValueError(
                "callback_url must be an absolute http:// or https:// URL with a host"
            ) from None
        if parsed.username or parsed.password:
            raise ValueError("callback_url must not carry credentials; the body is signed")
        return url

    @field_validator(
        "cpu_shares",
        "memory_mb",
        "timeout_seconds",
        "priority",
        "max_attempts",
        "retry_on_exit_codes",
        mode="before",
    )
    @classmethod
    def _json_integers_only(cls, value: Any) -> Any:
        """Integers as JSON has them: no `true` for 1 and no "5" for 5, as the schema says."""
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool | str):
                raise PydanticCustomError("int_type", "Input should be a valid integer")
        return value

    @field_validator("stdin")
    @classmethod
    def _stdin_has_no_surrogates(cls, stdin: str | None) -> str | None:
        if stdin is None:
            return None
        # No NUL either: a PostgreSQL text column cannot hold one, and each backend must
        # accept the same jobs.
        if not _is_unicode(stdin) or "\x00" in stdin:
            raise ValueError("stdin must be valid Unicode text without NUL bytes")
        return stdin

    @field_validator("image")
    @classmethod
    def _image_is_a_reference(cls, image: str) -> str:
        if not image:
            raise ValueError("image must not be empty")
        match = IMAGE_REFERENCE.match(image)
        if match is None:
            raise ValueError(
                "image is not a valid Docker image reference "
                "(lowercase repository, optional registry host, :tag and @digest; no spaces)"
            )
        domain = match.group("domain")
        if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
            # Docker reads "Foo/bar" as a repository path, and paths must be lowercase.
            if domain != domain.lower():
                raise ValueError("image repository must be lowercase")
        return image

    @field_validator("command")
    @classmethod
    def _command_is_argv(cls, command: list[str] | None) -> list[str] | None:
        if command is None:
            return None
        if not command:
            raise ValueError("command must not be empty; omit it to run the image's default")
        if len(command) > COMMAND_MAX_ARGS:
            raise ValueError(f"command has {len(command)} arguments; at most {COMMAND_MAX_ARGS}")
        for index, arg in enumerate(command):
            if "\x00" in arg:
                raise ValueError(f"command argument {index} contains a NUL byte")
            if len(arg.encode()) > ARG_MAX_BYTES:
                raise ValueError(f"command argument {index} is longer than {ARG_MAX_BYTES} bytes")
        return command

    @field_validator("env")
    @classmethod
    def _env_is_valid(cls, env: dict[str, str]) -> dict[str, str]:
        if len(env) > ENV_MAX_VARS:
            raise ValueError(f"env has {len(env)} variables; at most {ENV_MAX_VARS}")
        for name, value in env.items():
            if not ENV_NAME.match(name):
                raise ValueError(
                    f"env name {name!r} is not a valid variable name "
                    "(letters, digits and _, not starting with a digit)"
                )
            if "\x00" in value:
                raise ValueError(f"env value of {name} contains a NUL byte")
            if len(value.encode()) > ARG_MAX_BYTES:
                raise ValueError(f"env value of {name} is longer than {ARG_MAX_BYTES} bytes")
        return env

    @field_validator("retry_on_exit_codes")
    @classmethod
    def _exit_codes_are_failures(cls, codes: list[int] | None) -> list[int] | None:
        if codes is None:
            return None
        if not codes:
            raise ValueError("retry_on_exit_codes must not be empty; omit it to retry on any")
        bad = [code for code in codes if not 1 <= code <= 255]
        if bad:
            raise ValueError(f"retry_on_exit_codes must be failure codes 1..255, not {bad}")
        return sorted(set(codes))

    @field_validator("working_dir")
    @classmethod
    def _working_dir_is_absolute(cls, working_dir: str | None) -> str | None:
        if working_dir is None:
            return None
        if not working_dir.startswith("/") or "\x00" in working_dir:
            raise ValueError("working_dir must be an absolute path without NUL bytes")
        return working_dir


# The limits the engine actually applied, read back from the created container.
class AppliedLimits(BaseModel):
    cpu_shares: int
    memory_bytes: int
    memory_swap_bytes: int
    pids_limit: int
    timeout_seconds: int
    output_limit_bytes: int
    network_mode: str
    # Hardening read back too; None on jobs recorded before these were reported.
    nano_cpus: int | None = None
    read_only_rootfs: bool | None = None
    # The user the container runs as; "" is the image's own USER.
    user: str | None = None


# What a finished attempt used, where the engine could tell.
class ResourceReport(BaseModel):
    wall_seconds: float | None = None
    cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None
    # The image that actually ran: its id, and its registry digest when it has one.
    image_id: str | None = None
    image_digest: str | None = None


# One attempt to deliver a job's webhook.
class WebhookDelivery(BaseModel):
    attempt: int
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: float


# How one earlier attempt of a retried job ended.
class AttemptRecord(BaseModel):
    attempt: int
    state: JobState
    exit_code: int | None
    error: str | None
    worker_id: str | None
    started_at: datetime | None
    finished_at: datetime


# The stored job. Never returned directly: see JobSummary and JobPublic.
class Job(JobBase, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.Index("ix_jobs_claim", "state", "priority", "created_at"),
        sa.Index("ix_jobs_created_at", "created_at"),
        sa.Index("ix_jobs_lease", "state", "lease_expires_at"),
        sa.Index("ix_jobs_image", "image", "created_at"),
        sa.Index("ix_jobs_finished_at", "finished_at"),
        sa.Index("ix_jobs_callback", "callback_state", "callback_next_at"),
        sa.Index("ux_jobs_idempotency_key", "idempotency_key", unique=True),
        sa.Index("ix_jobs_owner", "owner", "created_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    state: JobState = Field(
        default=JobState.queued,
        sa_type=sa.Enum(
            JobState,
            native_enum=False,
            length=16,
            values_callable=lambda states: [s.value for s in states],
        ),
    )
    # Filled in at submission from settings when the caller leaves them out.
    cpu_shares: int = Field(ge=2, le=262144)
    memory_mb: int = Field(ge=6)
    timeout_seconds: int = Field(ge=1)

    run_after: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    attempt: int = Field(default=0)
    worker_id: str | None = Field(default=None, max_length=255)
    lease_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancel_requested: bool = Field(default=False)
    container_id: str | None = Field(default=None, max_length=128)
    limits: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    # Earlier attempts of a retried job, oldest first (AttemptRecord dumps).
    attempts: list[dict[str, Any]] | None = Field(default=None, sa_type=sa.JSON)

    exit_code: int | None = None
    stdout: str = Field(default="", sa_type=sa.Text)
    stderr: str = Field(default="", sa_type=sa.Text)
    output_truncated: bool = Field(default=False)
    error: str | None = Field(default=None, sa_type=sa.Text)
    # A ResourceReport dump, written with the terminal state.
    resources: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)

    stdin: str | None = Field(default=None, sa_type=sa.Text)
    # The webhook: due once the job is terminal, delivered by a worker (WebhookDelivery dumps).
    callback_state: CallbackState | None = Field(
        default=None,
        sa_type=sa.Enum(
            CallbackState,
            native_enum=False,
            length=16,
            values_callable=lambda states: [s.value for s in states],
        ),
    )
    callback_next_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    callback_deliveries: list[dict[str, Any]] | None = Field(default=None, sa_type=sa.JSON)
    # The API key that submitted the job (None: submitted while no key was configured).
    owner: uuid.UUID | None = Field(default=None)
    # POST /jobs with an Idempotency-Key: the key and a hash of the request it came with.
    # Stored as "<owner hex>:<key>" for a job with an owner, so tenants never collide.
    idempotency_key: str | None = Field(default=None, max_length=IDEMPOTENCY_COLUMN_LENGTH)
    request_hash: str | None = Field(default=None, max_length=64)

    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


# Output of a job as written while it runs: numbered chunks, per job, across attempts.
class LogChunk(SQLModel, table=True):
    __tablename__ = "job_log_chunks"

    job_id: uuid.UUID = Field(primary_key=True)
    seq: int = Field(primary_key=True)
    attempt: int
    stream: str = Field(max_length=6)
    data: str = Field(sa_type=sa.Text)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)


# A job as listed: everything but its output.
class JobSummary(JobBase):
    id: uuid.UUID
    state: JobState
    cpu_shares: int
    memory_mb: int
    timeout_seconds: int
    exit_code: int | None
    output_truncated: bool
    error: str | None
    attempt: int
    attempts: list[AttemptRecord]
    cancel_requested: bool
    limits: AppliedLimits | None
    resources: ResourceReport | None
    callback_state: CallbackState | None
    callback_deliveries: list[WebhookDelivery]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @field_validator("attempts", "callback_deliveries", mode="before")
    @classmethod
    def _none_yet(cls, records: list[Any] | None) -> list[Any]:
        return records or []


# A job as read by id: the summary plus stdout and stderr.
class JobPublic(JobSummary):
    stdout: str
    stderr: str


# One page of GET /jobs, newest first.
class JobPage(BaseModel):
    items: list[JobSummary]
    next_cursor: str | None


# The body of POST /jobs/batch: validated as a whole, stored as a whole.
class JobBatchCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "jobs": [
                        {"image": "busybox:latest", "command": ["echo", "1"]},
                        {"image": "busybox:latest", "command": ["echo", "2"]},
                    ]
                }
            ]
        },
    )

    jobs: list[JobCreate] = Field(min_length=1, max_length=BATCH_MAX_JOBS)


# The answer to POST /jobs/batch, the jobs in the order submitted.
class JobBatch(BaseModel):
    items: list[JobPublic]


# The body of every error response.
class ErrorBody(BaseModel):
    detail: str


# What a worker writes when a job reaches a terminal state.
class JobResult(BaseModel):
    state: JobState
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    error: str | None = None
    resources: ResourceReport | None = None
    # The attempt's container and the limits it ran under, stored with the result when
    # they were not recorded while it ran (a job shorter than the record delay).
    container_id: str | None = None
    limits: AppliedLimits | None = None


# The one row that names this database: containers carry its id, so a worker knows which
# containers on a shared engine belong to its installation.
class Instance(SQLModel, table=True):
    __tablename__ = "jobdock_instance"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)


# A caller's API key: only its SHA-256 is stored; the key itself is shown once at creation.
class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = (
        sa.Index("ux_api_keys_name", "name", unique=True),
        sa.Index("ux_api_keys_key_hash", "key_hash", unique=True),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=64)
    key_hash: str = Field(max_length=64)
    admin: bool = Field(default=False)
    # At most this many of the key's jobs queued / running at once (None: no limit).
    max_queued: int | None = Field(default=None)
    max_running: int | None = Field(default=None)
    created_at: datetime = Field(default_factory=utc_now, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


# Jobs in each state, of those the caller may see: every state, 0 when none.
class JobStateCounts(BaseModel):
    queued: int
    running: int
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int


# Workers holding a running job on any node; this process's pool slots (null: no pool).
class WorkerStats(BaseModel):
    active: int
    slots: int | None
    busy: int | None


# The answer to GET /stats.
class Stats(BaseModel):
    jobs: JobStateCounts
    workers: WorkerStats
