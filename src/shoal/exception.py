"""Exceptions raised by shoal, named and arranged as Modal's.

Error
├── AlreadyExistsError
├── AuthError
├── ClientClosed
├── ConnectionError
├── DataLossError
├── DeserializationError
├── ExecutionError
├── FilesystemExecutionError
├── InternalError
├── InvalidError
│   └── ConflictError
├── NotFoundError
├── PermissionDeniedError
├── RemoteError
│   └── ImageBuildError
├── ResourceExhaustedError
├── SandboxFilesystemError
│   ├── SandboxFilesystemDirectoryNotEmptyError
│   ├── SandboxFilesystemFileTooLargeError
│   ├── SandboxFilesystemIsADirectoryError
│   ├── SandboxFilesystemNotADirectoryError
│   ├── SandboxFilesystemNotFoundError
│   ├── SandboxFilesystemPathAlreadyExistsError
│   └── SandboxFilesystemPermissionError
├── SandboxTerminatedError
├── ServiceError
├── SnapshotCreationError
├── TimeoutError
│   ├── ExecTimeoutError
│   ├── InteractiveTimeoutError
│   └── SandboxTimeoutError
└── UnimplementedError
DeprecationError (UserWarning)
AsyncUsageWarning (UserWarning)
"""

from __future__ import annotations


class Error(Exception):
    """Base class for every shoal error."""


class AlreadyExistsError(Error):
    """An object with this name already exists."""


class AuthError(Error):
    """The daemon refused the caller's credentials."""


class ClientClosed(Error):
    """The object was detached or its client closed."""


class ConnectionError(Error):
    """The shoal daemon cannot be reached."""


class DataLossError(Error):
    """Data was lost or corrupted."""


class DeserializationError(Error):
    """A response could not be decoded."""


class ExecutionError(Error):
    """Something failed while running code (snapshots, logs)."""


class FilesystemExecutionError(Error):
    """A file operation failed in a way with no builtin exception."""


class InternalError(Error):
    """The daemon hit an unexpected error; its log says more."""


class InvalidError(Error):
    """Bad arguments: the message says what to change."""


class ConflictError(InvalidError):
    """The object is in a state that does not allow the operation."""


class NotFoundError(Error):
    """No such object."""


class PermissionDeniedError(Error):
    """The caller may not do this."""


class RemoteError(Error):
    """Something failed on the daemon's side."""


class ImageBuildError(RemoteError):
    """An image build step failed."""

    image_id: str | None = None


class ResourceExhaustedError(Error):
    """A limit was reached (resources, quotas)."""


class SandboxFilesystemError(Error):
    """Base of ``sb.filesystem`` errors."""


class SandboxFilesystemDirectoryNotEmptyError(SandboxFilesystemError):
    """A directory was not empty."""


class SandboxFilesystemFileTooLargeError(SandboxFilesystemError):
    """A file was too large for the operation."""


class SandboxFilesystemIsADirectoryError(SandboxFilesystemError):
    """A path was a directory where a file was expected."""


class SandboxFilesystemNotADirectoryError(SandboxFilesystemError):
    """A path was not a directory where one was expected."""


class SandboxFilesystemNotFoundError(SandboxFilesystemError):
    """A path does not exist."""


class SandboxFilesystemPathAlreadyExistsError(SandboxFilesystemError):
    """A path already exists."""


class SandboxFilesystemPermissionError(SandboxFilesystemError):
    """The sandbox's user may not access a path."""


class SandboxTerminatedError(Error):
    """The sandbox was terminated (return code 137)."""


class ServiceError(Error):
    """The daemon is unavailable or failed transiently."""


class SnapshotCreationError(Error):
    """A snapshot could not be made."""


class TimeoutError(Error):
    """Base of shoal's timeouts."""


class ExecTimeoutError(TimeoutError):
    """An exec passed its deadline (internal; exec deadlines give return code -1)."""


class InteractiveTimeoutError(TimeoutError):
    """An interactive session could not connect in time."""


class SandboxTimeoutError(TimeoutError):
    """The sandbox reached its timeout (return code 124)."""


class UnimplementedError(Error):
    """The feature is not implemented by this daemon."""


class DeprecationError(UserWarning):
    """A deprecated API was used."""


class AsyncUsageWarning(UserWarning):
    """A blocking shoal call ran inside an event loop: use its ``.aio`` form."""


ERRORS: dict[str, type[Error]] = {
    cls.__name__: cls
    for cls in [
        AlreadyExistsError,
        AuthError,
        ClientClosed,
        ConflictError,
        ConnectionError,
        DataLossError,
        DeserializationError,
        ExecTimeoutError,
        ExecutionError,
        FilesystemExecutionError,
        ImageBuildError,
        InteractiveTimeoutError,
        InternalError,
        InvalidError,
        NotFoundError,
        PermissionDeniedError,
        RemoteError,
        ResourceExhaustedError,
        SandboxFilesystemDirectoryNotEmptyError,
        SandboxFilesystemError,
        SandboxFilesystemFileTooLargeError,
        SandboxFilesystemIsADirectoryError,
        SandboxFilesystemNotADirectoryError,
        SandboxFilesystemNotFoundError,
        SandboxFilesystemPathAlreadyExistsError,
        SandboxFilesystemPermissionError,
        SandboxTerminatedError,
        SandboxTimeoutError,
        ServiceError,
        SnapshotCreationError,
        TimeoutError,
        UnimplementedError,
        Error,
    ]
}
"""Exception classes by name: how errors cross the HTTP boundary."""
