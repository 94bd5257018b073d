"""Domain exceptions. They cross layers as they are and become HTTP codes only in app/api."""


class JobdockError(Exception):
    """Jobdock failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__ or type(self).__name__)

    @property
    def message(self) -> str:
        return str(self.args[0])


class JobNotFound(JobdockError):
    """No job has this id."""


class JobAlreadyFinished(JobdockError):
    """The job has already finished."""


class InvalidCursor(JobdockError):
    """The cursor is not one that this service handed out."""


class EngineError(JobdockError):
    """The Docker engine failed."""


class EngineUnreachable(EngineError):
    """The Docker engine cannot be reached."""


class ContainerGone(EngineError):
    """The job's container disappeared: it was removed outside Jobdock."""


class ImageNotFound(EngineError):
    """The image is not on the engine and cannot be pulled."""


class JobStillActive(JobdockError):
    """The job is still queued or running."""


class QueueFull(JobdockError):
    """Too many jobs are queued; try again later."""

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class IdempotencyKeyReused(JobdockError):
    """The Idempotency-Key was already used with a different request."""


class QuotaExceeded(JobdockError):
    """The API key has as many jobs queued or running as its quota allows."""

    def __init__(self, message: str, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ApiKeyNameTaken(JobdockError):
    """An API key already has this name."""


class ApiKeyNotFound(JobdockError):
    """No API key has this name."""
