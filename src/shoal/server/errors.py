"""The server's side of the error boundary: exception class → HTTP status.

Error bodies are ``{"error": {"type": "<class name>", "message": "..."}}``; the
client maps the type name back to the same class (``shoal.sdk.transport``).
"""

from __future__ import annotations

from shoal import exception as exc

STATUS: dict[type[exc.Error], int] = {
    exc.InvalidError: 400,
    exc.AuthError: 401,
    exc.PermissionDeniedError: 403,
    exc.NotFoundError: 404,
    exc.AlreadyExistsError: 409,
    exc.ConflictError: 409,
    exc.ResourceExhaustedError: 429,
    exc.UnimplementedError: 501,
    exc.ServiceError: 503,
    exc.TimeoutError: 504,
}


def status_for(error: exc.Error) -> int:
    """The HTTP status for a shoal exception (most specific class wins)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def body_for(error: BaseException) -> dict[str, dict[str, str]]:
    """The JSON error body."""
    name = type(error).__name__ if isinstance(error, exc.Error) else "InternalError"
    return {"error": {"type": name, "message": str(error)}}
