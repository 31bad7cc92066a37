"""Every error class of the service: plain Python, mapped to HTTP answers by web.middlewares."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A setting has a value Cylindria cannot start with; the message names it."""


class JobConflict(Exception):
    """The registry holds this job id already, for a job that is not rejected."""

    def __init__(self, job: Any) -> None:
        super().__init__(job.job_id)
        self.job = job


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a sentence saying what to do.

    `extra` goes into the JSON `error` object; `reply` holds fields that stand beside
    it at the top of the body (a job's id, GPU and state, in answers about one job).
    """

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None,
                 reply: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra or {}
        self.headers = headers
        self.reply = reply or {}

    def __reduce__(self) -> tuple[object, ...]:
        # Whole, across a process boundary (workflows are read in a worker).
        return (_rebuild, (type(self), self.message, self.extra, self.headers, self.reply))


def _rebuild(cls: type[ApiError], message: str, extra: dict[str, Any],
             headers: dict[str, str] | None, reply: dict[str, Any]) -> ApiError:
    return cls(message, extra=extra, headers=headers, reply=reply)


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class InvalidWorkflow(ApiError):
    status = 422
    code = "invalid_workflow"


class BodyTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedEncoding(ApiError):
    status = 415
    code = "unsupported_encoding"


class TooManyNodes(ApiError):
    status = 413
    code = "too_many_nodes"


class CallbackNotAllowed(ApiError):
    """A callback URL points where webhooks must not go, or carries a user name or
    password."""

    status = 422
    code = "callback_not_allowed"


class WorkflowRejected(ApiError):
    """ComfyUI's own validation refused the workflow."""

    status = 422
    code = "validation_failed"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class BodyTimeout(ApiError):
    """A request body arrived too slowly, or stopped arriving: nothing of it is kept."""

    status = 408
    code = "body_timeout"


class InputInvalid(ApiError):
    """An input file sent with a job or to the input store is not usable as sent."""

    status = 422
    code = "invalid_input"


class UnknownInput(ApiError):
    """A workflow references an input the store does not hold."""

    status = 422
    code = "unknown_input"


class InputUnavailable(ApiError):
    """An input given by URL could not be fetched (refused, unreachable, too large)."""

    status = 422
    code = "input_unavailable"


class InputNotFound(ApiError):
    status = 404
    code = "input_not_found"


class InputInUse(ApiError):
    status = 409
    code = "input_in_use"


class InputGone(ApiError):
    """A job's input was removed from the store before the job could run."""

    status = 409
    code = "input_gone"


class InputStoreFull(ApiError):
    """Every stored input is in use by a job in flight and a new one would not fit."""

    status = 507
    code = "input_store_full"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class JobNotFound(ApiError):
    status = 404
    code = "job_not_found"


class AmbiguousJobId(ApiError):
    """Nodes sharing the database: no job of this id here, and several other nodes hold
    one."""

    status = 409
    code = "ambiguous_job_id"


class NodeNotAlive(ApiError):
    """Nodes sharing the database: the job is another node's, and that node is not alive,
    so nothing can be passed to it."""

    status = 409
    code = "node_not_alive"

    def __init__(self, job: Any, message: str, node: str) -> None:
        super().__init__(message, extra={"node": node})
        self.job = job


class OutputNotFound(ApiError):
    status = 404
    code = "output_not_found"


class JobIdConflict(ApiError):
    status = 409
    code = "job_id_conflict"


class JobTakenElsewhere(JobIdConflict):
    """Nodes sharing a database: another node wrote a job of this id first (or took
    this node's held job), so this node's write of it changed nothing."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"Job id {job_id!r} was taken by another node at the same moment; job ids are "
            f"unique across the nodes. GET /jobstatus/{job_id}/ shows that job; submit "
            "this workflow under another id.", extra={"job_id": job_id})


class JobFinished(ApiError):
    """The job is terminal already: nothing to cancel."""

    status = 409
    code = "job_finished"

    def __init__(self, job: Any, message: str) -> None:
        super().__init__(message)
        self.job = job


class NotRetryable(ApiError):
    """Only a failed, cancelled or rejected job can run again."""

    status = 409
    code = "not_retryable"


class AttemptsExhausted(ApiError):
    """The job ran every attempt CYLINDRIA_MAX_ATTEMPTS allows one job id."""

    status = 409
    code = "attempts_exhausted"


class GpuDrained(ApiError):
    status = 409
    code = "gpu_drained"


class UnknownGpu(ApiError):
    status = 400
    code = "unknown_gpu"


class TooManyStreams(ApiError):
    status = 429
    code = "too_many_streams"


class TooManyWaiters(ApiError):
    """Too many requests wait with ?wait= for jobs to finish, in all or from one address."""

    status = 429
    code = "too_many_waiters"


class TooManyAttempts(ApiError):
    """Too many wrong keys from one client address: its keys are not checked for a while."""

    status = 429
    code = "too_many_attempts"


class QueueFull(ApiError):
    """Cylindria's own queue for GpuId=auto holds CYLINDRIA_MAX_HELD jobs already."""

    status = 503
    code = "queue_full"


class TooManyConnections(ApiError):
    """One client address holds as many connections as it may: answered as a connection
    opens, before any request on it is read."""

    status = 503
    code = "too_many_connections"


class ServerBusy(ApiError):
    """Cylindria holds as many connections as it takes from all clients together."""

    status = 503
    code = "server_busy"


class BackendError(ApiError):
    """ComfyUI answered, but not in a way Cylindria understands."""

    status = 502
    code = "backend_error"


class BackendUnavailable(BackendError):
    status = 502
    code = "backend_unavailable"


class BackendTimeout(BackendError):
    status = 504
    code = "backend_timeout"


class StateUnavailable(ApiError):
    """The journal cannot write: no new job is accepted until it can."""

    status = 503
    code = "state_unavailable"


class CannotListen(Exception):
    """The address to serve on is taken or not this machine's; the message says which."""


class StateFileError(Exception):
    """The state file cannot be used at start-up; the message names it and what to do."""
