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
├── InternalFailure
├── InvalidError
│   └── ConflictError
├── LogsFetchError
├── NotFoundError
├── PermissionDeniedError
├── RemoteError
│   └── ImageBuildError
├── RequestSizeError
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
├── SerializationError
├── ServiceError
├── SnapshotCreationError
├── TimeoutError
│   ├── ExecTimeoutError
│   ├── FunctionTimeoutError
│   ├── InteractiveTimeoutError
│   ├── MountUploadTimeoutError
│   ├── OutputExpiredError
│   ├── SandboxTimeoutError
│   └── VolumeUploadTimeoutError
├── UnimplementedError
├── VersionError
└── WorkspaceManagementError
DeprecationError (UserWarning)
AsyncUsageWarning (UserWarning)
ServerWarning (UserWarning)
InputCancellation (BaseException), ModuleNotMountable (Exception): Modal's, for Functions
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


class InternalFailure(Error):
    """Modal's name for a failure inside its own machinery; shoal raises ``InternalError`` instead."""


class InvalidError(Error):
    """Bad arguments: the message says what to change."""


class ConflictError(InvalidError):
    """The object is in a state that does not allow the operation."""


class NotFoundError(Error):
    """No such object."""


class LogsFetchError(Error):
    """Logs could not be fetched."""


class PermissionDeniedError(Error):
    """The caller may not do this."""


class RemoteError(Error):
    """Something failed on the daemon's side."""


class ImageBuildError(RemoteError):
    """An image build step failed."""

    image_id: str | None = None


class ResourceExhaustedError(Error):
    """A limit was reached (resources, quotas)."""


class RequestSizeError(Error):
    """A request was larger than the daemon accepts."""


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


class SerializationError(Error):
    """A value could not be serialized."""


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


class FunctionTimeoutError(TimeoutError):
    """Modal's timeout of a Function call (shoal runs no Functions)."""


class MountUploadTimeoutError(TimeoutError):
    """Uploading files for a mount took too long."""


class OutputExpiredError(TimeoutError):
    """Output was asked for after it expired."""


class VolumeUploadTimeoutError(TimeoutError):
    """Uploading files to a volume took too long."""


class UnimplementedError(Error):
    """The feature is not implemented by this daemon."""


class VersionError(Error):
    """The client's and the daemon's versions do not work together."""


class WorkspaceManagementError(Error):
    """Modal's workspace management failed (shoal has no workspaces)."""


class DeprecationError(UserWarning):
    """A deprecated API was used."""


class AsyncUsageWarning(UserWarning):
    """A blocking shoal call ran inside an event loop: use its ``.aio`` form."""


class ServerWarning(UserWarning):
    """A warning the daemon sends along with an answer."""


class InputCancellation(BaseException):
    """Modal's cancellation of a Function input (shoal runs no Functions)."""


class ModuleNotMountable(Exception):
    """Modal's error for a module that cannot be mounted into a Function."""


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
        FunctionTimeoutError,
        InternalFailure,
        LogsFetchError,
        MountUploadTimeoutError,
        OutputExpiredError,
        RequestSizeError,
        SerializationError,
        VersionError,
        VolumeUploadTimeoutError,
        WorkspaceManagementError,
        Error,
    ]
}
"""Exception classes by name: how errors cross the HTTP boundary."""
